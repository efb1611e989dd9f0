// Switchable normalisation on the CPU, registered as torch.ops.snzoo.*; built on first use by
// snzoo/nn/cpu_kernels.py with the machine's compiler. The full-size passes are in sn_passes.h (output),
// sn_moments.h and sn_row_moments.h (statistics) and sn_grad_passes.h (backward), the (N, C) work in sn_mixing.h.
//
// One operator per layer and direction, with autograd:
// - switch_norm(x, weight, bias, mean_probs, var_probs, terms, group, running_mean?, running_var?, training, momentum,
//   moving_average, eps, logits=False, relu=False, residual=None) -> y: a whole SN layer, plus residual (x's shape,
//   strides and dtype) where given, then relu where asked, in its output pass (the values of the separate operations;
//   the backward masks the gradient by the output, as relu's own). terms gives the statistic of each probability (0
//   IN, 1 LN, 2 BN); with logits, mean_probs and var_probs are the raw importance weights, whose softmax the layer
//   takes (and whose gradients the backward returns); group is the number of samples of a BN statistics group (a
//   ghost batch; N without). In training with a BN term the running buffers are updated here; in eval the BN term is
//   the running buffers. Its backward is switch_norm_backward; both directions do their (N, C) algebra (the mixing,
//   its chain rule, the running update) here in float64, so that a layer costs one call each way whatever its batch
//   and map size.
// - switch_norm_forward(...) -> (y, mean_in, var_in, centre) and switch_norm_backward(grad_y, x, ..., mean_in,
//   var_in, centre, output_mask) -> (dx, dweight, dbias, dmean_probs, dvar_probs): the two directions.
//
// The full-size passes alone, for callers that do the (N, C) algebra themselves (synchronised statistics):
// - sn_moments(x) -> (mean, var, centre): per-(n, c) IN mean and unbiased variance (float64); centre = the mean
//   rounded to the compute dtype, which the other passes take values relative to.
// - sn_apply(x, centre, scale, shift) -> y = (x - centre) * scale + shift, per (n, c), in x's dtype and layout.
// - sn_grad_sums(g, x, centre) -> (sum_L g, sum_L g * (x - centre)) per (n, c), float64, one read of g and x.
// - sn_grad_input(g, x, centre, a, b, c) -> dx = g * a + (x - centre) * b + c per (n, c), in x's dtype and layout.

#include "sn_mixing.h"
#include "sn_passes.h"
#include "sn_grad_passes.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

namespace {

using namespace snzoo_cpu;
using at::Tensor;
using c10::optional;

// ------------------------------------------------------------------------------------------------ passes
std::tuple<at::Tensor, at::Tensor, at::Tensor> sn_moments(const at::Tensor& x) {
  const View v = view_of(x, "sn_moments");
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor mean = at::empty({v.n, v.c}, f64), var = at::empty({v.n, v.c}, f64);
  at::Tensor centre;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sn_moments", [&] {
    using A = typename Compute<scalar_t>::type;
    centre = at::empty({v.n, v.c}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
    moments<scalar_t>(x.data_ptr<scalar_t>(), v, centre.data_ptr<A>(), mean.data_ptr<double>(), var.data_ptr<double>());
  });
  return {mean, var, centre};
}


at::Tensor sn_apply(const at::Tensor& x, const at::Tensor& centre, const at::Tensor& scale, const at::Tensor& shift) {
  const View v = view_of(x, "sn_apply");
  at::Tensor y = at::empty_like(x);  // preserve_format: x's dense layout
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sn_apply", [&] {
    using A = typename Compute<scalar_t>::type;
    apply<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), v, per_row<A>(centre, v, "sn_apply", "centre"),
                    per_row<A>(scale, v, "sn_apply", "scale"), per_row<A>(shift, v, "sn_apply", "shift"));
  });
  return y;
}


std::tuple<at::Tensor, at::Tensor> sn_grad_sums(const at::Tensor& g, const at::Tensor& x, const at::Tensor& centre) {
  const View v = view_of(x, "sn_grad_sums");
  same_layout(g, x, "sn_grad_sums", "g");
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor sum_g = at::empty({v.n, v.c}, f64), sum_gd = at::empty({v.n, v.c}, f64);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sn_grad_sums", [&] {
    using A = typename Compute<scalar_t>::type;
    grad_sums<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), v, per_row<A>(centre, v, "sn_grad_sums", "centre"),
                        sum_g.data_ptr<double>(), sum_gd.data_ptr<double>());
  });
  return {sum_g, sum_gd};
}

at::Tensor sn_grad_input(const at::Tensor& g, const at::Tensor& x, const at::Tensor& centre, const at::Tensor& a,
                         const at::Tensor& b, const at::Tensor& c) {
  const View v = view_of(x, "sn_grad_input");
  same_layout(g, x, "sn_grad_input", "g");
  at::Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sn_grad_input", [&] {
    using A = typename Compute<scalar_t>::type;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* out = dx.data_ptr<scalar_t>();
    const A* m = per_row<A>(centre, v, "sn_grad_input", "centre");
    const A* pa = per_row<A>(a, v, "sn_grad_input", "a");
    const A* pb = per_row<A>(b, v, "sn_grad_input", "b");
    const A* pc = per_row<A>(c, v, "sn_grad_input", "c");
    affine_pass<scalar_t, true>(xp, gp, out, v, m, pa, pb, pc);
  });
  return dx;
}


// ------------------------------------------------------------------------------------------------ forward
std::tuple<Tensor, Tensor, Tensor, Tensor> switch_norm_forward(
    const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& mean_probs, const Tensor& var_probs,
    at::IntArrayRef terms, int64_t group, const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    bool training, double momentum, bool moving_average, double eps, bool logits, bool relu,
    const optional<Tensor>& residual) {
  const View v = view_of(x, "switch_norm");
  if (residual.has_value()) same_layout(*residual, x, "switch_norm", "residual");
  const Mixing m(v, weight, mean_probs, var_probs, terms, group, running_mean, running_var, training, logits);
  const std::vector<double> b = doubles(bias, v.c, "bias");
  const auto f64 = x.options().dtype(at::kDouble);
  Tensor mean = at::empty({v.n, v.c}, f64), var = at::empty({v.n, v.c}, f64), centre;
  Tensor y = at::empty_like(x);  // preserve_format: x's dense layout
  Statistics s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "switch_norm", [&] {
    using A = typename Compute<scalar_t>::type;
    centre = at::empty({v.n, v.c}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    double* mp = mean.data_ptr<double>();
    double* vp = var.data_ptr<double>();
    A* cp = centre.data_ptr<A>();
    std::vector<A> scale(v.n * v.c), shift(v.n * v.c);
    // Without BN statistics of the batch a sample needs only its own: both passes of a sample run back to back, so
    // that the second read finds it in cache. A sample larger than the core's caches is split over the threads
    // (the passes parallelise inside it); smaller ones go one per task, in one parallel region for the layer. The
    // passes split a sample's work the same way in both cases, so the results do not depend on the schedule.
    const bool own_statistics = !(m.has_bn && training);
    const bool large = v.c * v.l * int64_t(sizeof(scalar_t)) >= kSampleAtOnceBytes;
    if (own_statistics && (large || v.n >= 2 * at::get_num_threads())) {
      const View one{1, v.c, v.l, v.nlc};
      Mixing sample_mixing = m;
      sample_mixing.n = 1;
      auto sample = [&](int64_t i, Statistics& own) {
        const int64_t offset = i * v.c * v.l, r0 = i * v.c;
        moments<scalar_t>(xp + offset, one, cp + r0, mp + r0, vp + r0);
        fill_statistics(sample_mixing, mp + r0, vp + r0, own);
        scale_and_shift<A>(sample_mixing, own, b, 0, 1, eps, cp + r0, scale.data() + r0, shift.data() + r0);
        apply<scalar_t>(xp + offset, yp + offset, one, cp + r0, scale.data() + r0, shift.data() + r0, relu,
                        rp != nullptr ? rp + offset : nullptr);
      };
      if (large) {
        Statistics own;
        for (int64_t i = 0; i < v.n; ++i) sample(i, own);
      } else {  // the passes' own parallel_for runs inline inside this one
        at::parallel_for(0, v.n, 1, [&](int64_t begin, int64_t end) {
          Statistics own;
          for (int64_t i = begin; i < end; ++i) sample(i, own);
        });
      }
    } else {
      moments<scalar_t>(xp, v, cp, mp, vp);
      s = statistics(m, mp, vp);
      scale_and_shift<A>(m, s, b, 0, v.n, eps, cp, scale.data(), shift.data());
      apply<scalar_t>(xp, yp, v, cp, scale.data(), shift.data(), relu, rp);
    }
  });
  if (training && m.has_bn && running_mean.has_value() && running_var.has_value()) {
    Tensor rm = *running_mean, rv = *running_var;
    update_running(rm, rv, s, m, momentum, moving_average);
  }
  return {y, mean, var, centre};
}

// ------------------------------------------------------------------------------------------------ backward
// With y = (x - mu) * a + b, a = weight * r, r = (sigma2 + eps)^-1/2, and S1 = sum_L g, T = sum_L g * (x - mu) per
// (n, c): dbias = sum_N S1, dweight = sum_N r T, dmu = -a S1, dsigma2 = -weight T r^3 / 2; the probabilities get
// sum_NC dmu * mean_k and sum_NC dsigma2 * var_k; the IN statistics get the chain rule of the mixing (pooled terms:
// mean = mean of mean_in, var = mean of var_in + (mean_in - mean)^2; eval BN: constants), and
// dx = g * a + dmean_in / L + dvar_in * 2 (x - mean_in) / (L - 1), taken relative to the centre.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> switch_norm_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& mean_probs,
    const Tensor& var_probs, at::IntArrayRef terms, int64_t group, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, bool training, double eps, const Tensor& mean_in, const Tensor& var_in,
    const Tensor& centre, std::array<bool, 4> output_mask, bool logits) {
  const View v = view_of(x, "switch_norm_backward");
  const Mixing m(v, weight, mean_probs, var_probs, terms, group, running_mean, running_var, training, logits);
  const int64_t n = v.n, c = v.c, rows = n * c, k = int64_t(m.slots.size());
  const double* mi = per_row<double>(mean_in, v, "switch_norm_backward", "mean_in");
  const double* vi = per_row<double>(var_in, v, "switch_norm_backward", "var_in");
  const Statistics s = statistics(m, mi, vi);
  // the passes read g in x's layout and dtype
  const bool same = grad_y.sizes() == x.sizes() && grad_y.strides() == x.strides() &&
                    grad_y.scalar_type() == x.scalar_type();
  const Tensor g = same ? grad_y : at::empty_like(x).copy_(grad_y);
  std::vector<double> s1(rows), sgc(rows);
  Tensor dx;
  std::vector<double> d_mu(rows), d_sigma2(rows), a(rows), dweight(c, 0), dbias(c, 0), dpm(k, 0), dpv(k, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "switch_norm_backward", [&] {
    using A = typename Compute<scalar_t>::type;
    const A* cp = per_row<A>(centre, v, "switch_norm_backward", "centre");
    grad_sums<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), v, cp, s1.data(), sgc.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t j = r % c;
      const double inv = 1 / std::sqrt(s.sigma2[r] + eps);
      const double t = sgc[r] - (s.mu[r] - double(cp[r])) * s1[r];  // sum_L g * (x - mu)
      a[r] = m.weight[j] * inv;
      d_mu[r] = -a[r] * s1[r];
      d_sigma2[r] = -0.5 * m.weight[j] * t * inv * inv * inv;
      dweight[j] += inv * t;
      dbias[j] += s1[r];
    }
    for (int64_t t = 0; t < k; ++t)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < c; ++j) {
          dpm[t] += s.mean_of(m, m.slots[t], i, j, mi) * d_mu[i * c + j];
          dpv[t] += s.var_of(m, m.slots[t], i, j, vi) * d_sigma2[i * c + j];
        }
    if (!output_mask[0]) return;
    std::vector<double> d_mean(rows, 0), d_var(rows, 0);
    for (int64_t t = 0; t < k; ++t) {
      const double pm = m.pm[t], pv = m.pv[t];
      const int64_t slot = m.slots[t];
      if (slot == kIn) {
        for (int64_t r = 0; r < rows; ++r) {
          d_mean[r] += pm * d_mu[r];
          d_var[r] += pv * d_sigma2[r];
        }
      } else if (slot == kLn) {
        for (int64_t i = 0; i < n; ++i) {
          double gm = 0, gv = 0;
          for (int64_t j = 0; j < c; ++j) {
            gm += d_mu[i * c + j];
            gv += d_sigma2[i * c + j];
          }
          gm *= pm / double(c);
          gv *= pv / double(c);
          for (int64_t j = 0; j < c; ++j) {
            d_mean[i * c + j] += gm + 2 * (mi[i * c + j] - s.mean_ln[i]) * gv;
            d_var[i * c + j] += gv;
          }
        }
      } else if (training) {  // BN over each group of samples
        const int64_t size = m.group;
        std::vector<double> gm(c), gv(c);
        for (int64_t g0 = 0; g0 < n; g0 += size) {
          std::fill(gm.begin(), gm.end(), 0.0);
          std::fill(gv.begin(), gv.end(), 0.0);
          for (int64_t i = g0; i < g0 + size; ++i)
            for (int64_t j = 0; j < c; ++j) {
              gm[j] += d_mu[i * c + j];
              gv[j] += d_sigma2[i * c + j];
            }
          const double* mb = s.mean_bn.data() + (g0 / size) * c;
          for (int64_t i = g0; i < g0 + size; ++i)
            for (int64_t j = 0; j < c; ++j) {
              const double gmj = gm[j] * pm / double(size), gvj = gv[j] * pv / double(size);
              d_mean[i * c + j] += gmj + 2 * (mi[i * c + j] - mb[j]) * gvj;
              d_var[i * c + j] += gvj;
            }
        }
      }  // eval BN: the running buffers, constants
    }
    std::vector<A> ca(rows), cb(rows), cc(rows);
    const double length = double(v.l);
    for (int64_t r = 0; r < rows; ++r) {
      const double coef_b = 2 * d_var[r] / (length - 1);
      ca[r] = A(a[r]);
      cb[r] = A(coef_b);
      cc[r] = A(d_mean[r] / length - coef_b * (mi[r] - double(cp[r])));
    }
    dx = at::empty_like(x);
    affine_pass<scalar_t, true>(x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), v, cp,
                                ca.data(), cb.data(), cc.data());
  });
  if (logits) {  // through the softmax to the raw importance weights
    softmax_backward(m.pm, dpm);
    softmax_backward(m.pv, dpv);
  }
  auto as_like = [](const std::vector<double>& values, const Tensor& like, bool wanted) {
    if (!wanted) return Tensor();
    Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "switch_norm_backward", [&] {
      scalar_t* p = out.data_ptr<scalar_t>();
      for (size_t i = 0; i < values.size(); ++i) p[i] = from_double<scalar_t>(values[i]);
    });
    return out;
  };
  return {dx, as_like(dweight, weight, output_mask[1]), as_like(dbias, bias, output_mask[2]),
          as_like(dpm, mean_probs, output_mask[3]), as_like(dpv, var_probs, output_mask[3])};
}

// ------------------------------------------------------------------------------------------------ autograd
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SwitchNormFunction : public torch::autograd::Function<SwitchNormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias,
                        const Tensor& mean_probs, const Tensor& var_probs, std::vector<int64_t> terms, int64_t group,
                        const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
                        double momentum, bool moving_average, double eps, bool logits, bool relu,
                        const optional<Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("snzoo::switch_norm_forward", "")
                         .typed<decltype(switch_norm_forward)>();
    auto [y, mean_in, var_in, centre] = op.call(x, weight, bias, mean_probs, var_probs, terms, group, running_mean,
                                                running_var, training, momentum, moving_average, eps, logits, relu,
                                                residual);
    // In eval the BN term reads the running buffers: the backward keeps its own copy (the buffers may change
    // before it runs).
    const bool eval_bn = !training && running_mean.has_value() && running_var.has_value();
    const Tensor rm = eval_bn ? running_mean->detach().clone() : Tensor();
    const Tensor rv = eval_bn ? running_var->detach().clone() : Tensor();
    // with relu, the output says where the gradient passes (as relu's own backward reads it)
    ctx->save_for_backward({x, weight, bias, mean_probs, var_probs, mean_in, var_in, centre, rm, rv,
                            relu ? y : Tensor()});
    ctx->saved_data["terms"] = terms;
    ctx->saved_data["group"] = group;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["logits"] = logits;
    ctx->saved_data["residual"] = residual.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("snzoo::switch_norm_backward", "")
                         .typed<decltype(switch_norm_backward)>();
    const std::vector<int64_t> terms = ctx->saved_data["terms"].toIntVector();
    const optional<Tensor> rm = saved[8].defined() ? optional<Tensor>(saved[8]) : c10::nullopt;
    const optional<Tensor> rv = saved[9].defined() ? optional<Tensor>(saved[9]) : c10::nullopt;
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   ctx->needs_input_grad(3) || ctx->needs_input_grad(4)};
    const Tensor grad_y = saved[10].defined() ? at::threshold_backward(grad_outputs[0], saved[10], 0) : grad_outputs[0];
    // y = relu(layer(x) + residual): the residual's gradient is the (masked) gradient of y (no copy: the same tensor)
    const Tensor grad_residual = ctx->saved_data["residual"].toBool() ? grad_y : Tensor();
    auto [dx, dweight, dbias, dpm, dpv] = op.call(
        grad_y, saved[0], saved[1], saved[2], saved[3], saved[4], terms, ctx->saved_data["group"].toInt(), rm,
        rv, ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(), saved[5], saved[6], saved[7], mask,
        ctx->saved_data["logits"].toBool());
    return {dx, dweight, dbias, dpm, dpv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), grad_residual};
  }
};

Tensor switch_norm_autograd(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& mean_probs,
                            const Tensor& var_probs, at::IntArrayRef terms, int64_t group,
                            const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
                            double momentum, bool moving_average, double eps, bool logits, bool relu,
                            const optional<Tensor>& residual) {
  const bool records = at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() ||
                                                      bias.requires_grad() || mean_probs.requires_grad() ||
                                                      var_probs.requires_grad() ||
                                                      (residual.has_value() && residual->requires_grad()));
  if (!records) {  // nothing to save for a backward (eval, torch.no_grad): the forward alone
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("snzoo::switch_norm_forward", "")
                         .typed<decltype(switch_norm_forward)>();
    return std::get<0>(op.call(x, weight, bias, mean_probs, var_probs, terms, group, running_mean, running_var,
                               training, momentum, moving_average, eps, logits, relu, residual));
  }
  return SwitchNormFunction::apply(x, weight, bias, mean_probs, var_probs, terms.vec(), group, running_mean,
                                   running_var, training, momentum, moving_average, eps, logits, relu, residual);
}

Tensor switch_norm_plain(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& mean_probs,
                         const Tensor& var_probs, at::IntArrayRef terms, int64_t group,
                         const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
                         double momentum, bool moving_average, double eps, bool logits, bool relu,
                         const optional<Tensor>& residual) {
  return std::get<0>(switch_norm_forward(x, weight, bias, mean_probs, var_probs, terms, group, running_mean,
                                         running_var, training, momentum, moving_average, eps, logits, relu,
                                         residual));
}

}  // namespace

TORCH_LIBRARY(snzoo, m) {
#define SNZOO_LAYER_ARGS                                                                                         \
  "Tensor x, Tensor weight, Tensor bias, Tensor mean_probs, Tensor var_probs, int[] terms, int group, "         \
  "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, bool moving_average, "     \
  "float eps, bool logits=False, bool relu=False, Tensor? residual=None"
  m.def("switch_norm(" SNZOO_LAYER_ARGS ") -> Tensor");
  m.def("switch_norm_forward(" SNZOO_LAYER_ARGS ") -> (Tensor, Tensor, Tensor, Tensor)");
#undef SNZOO_LAYER_ARGS
  m.def(
      "switch_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean_probs, "
      "Tensor var_probs, int[] terms, int group, Tensor? running_mean, Tensor? running_var, bool training, "
      "float eps, Tensor mean_in, Tensor var_in, Tensor centre, bool[4] output_mask, bool logits=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sn_moments(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("sn_apply(Tensor x, Tensor centre, Tensor scale, Tensor shift) -> Tensor");
  m.def("sn_grad_sums(Tensor g, Tensor x, Tensor centre) -> (Tensor, Tensor)");
  m.def("sn_grad_input(Tensor g, Tensor x, Tensor centre, Tensor a, Tensor b, Tensor c) -> Tensor");
}

TORCH_LIBRARY_IMPL(snzoo, CPU, m) {
  m.impl("switch_norm", &switch_norm_plain);
  m.impl("switch_norm_forward", &switch_norm_forward);
  m.impl("switch_norm_backward", &switch_norm_backward);
  m.impl("sn_moments", &sn_moments);
  m.impl("sn_apply", &sn_apply);
  m.impl("sn_grad_sums", &sn_grad_sums);
  m.impl("sn_grad_input", &sn_grad_input);
}

TORCH_LIBRARY_IMPL(snzoo, Autograd, m) {
  m.impl("switch_norm", &switch_norm_autograd);
}
