// The (N, C)-sized work of a switchable-normalisation layer, shared by the forward and the backward of
// switch_norm_cpu.cpp: the layer's configuration (terms, probabilities, BN groups or running buffers), the pooled LN
// and BN statistics and their mixtures, the running-buffer update, the forward's per-(n, c) scale and shift. All in
// float64; the pooled variances in the cancellation-free form mean(var) + mean((mean - pooled mean)^2).

#pragma once

#include "sn_moments.h"

#include <ATen/core/grad_mode.h>

#include <vector>

namespace snzoo_cpu {

using at::Tensor;
using c10::optional;

// ------------------------------------------------------------------------------------------------ (N, C) algebra
enum Slot : int64_t { kIn = 0, kLn = 1, kBn = 2 };

// Small per-channel or per-term tensors (any floating dtype, any shape) as float64 values.
inline std::vector<double> doubles(const Tensor& t, int64_t count, const char* what) {
  TORCH_CHECK(t.numel() == count, "switch_norm: ", what, " must have ", count, " values, not ", t.numel());
  const Tensor dense = t.contiguous();
  std::vector<double> out(count);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dense.scalar_type(), "doubles", [&] {
    const scalar_t* p = dense.data_ptr<scalar_t>();
    for (int64_t i = 0; i < count; ++i) out[i] = double(load(p[i]));
  });
  return out;
}

// The gradient of softmax's inputs from the gradient of its outputs p: p * (grad - sum(p * grad)), in place.
inline void softmax_backward(const std::vector<double>& p, std::vector<double>& grad) {
  double dot = 0;
  for (size_t t = 0; t < p.size(); ++t) dot += p[t] * grad[t];
  for (size_t t = 0; t < p.size(); ++t) grad[t] = p[t] * (grad[t] - dot);
}

// One layer's mixing: which terms, their probabilities, the BN groups or running buffers, the affine weight.
struct Mixing {
  int64_t n, c, group;
  bool training;
  std::vector<int64_t> slots;  // the statistic of probability k
  std::vector<double> pm, pv;
  bool has_ln = false, has_bn = false;
  std::vector<double> weight;
  std::vector<double> running_mean, running_var;  // eval with a BN term: the BN statistics

  // logits: mean_probs and var_probs are the raw importance weights, whose softmax the mixing takes
  Mixing(const View& v, const Tensor& w, const Tensor& mean_probs, const Tensor& var_probs, at::IntArrayRef terms,
         int64_t group_size, const optional<Tensor>& rm, const optional<Tensor>& rv, bool train, bool logits)
      : n(v.n), c(v.c), group(group_size), training(train), slots(terms.begin(), terms.end()) {
    const int64_t k = int64_t(slots.size());
    TORCH_CHECK(k >= 1 && k <= 3, "switch_norm: between 1 and 3 terms");
    // torch's own softmax, so that the probabilities are those of the layer's importance_weights() bit for bit: with
    // a mean that dwarfs the spread the output depends on their rounding (their sum is 1 only to float32 precision)
    pm = doubles(logits ? at::_softmax(mean_probs.reshape({-1}), 0, false) : mean_probs, k, "mean_probs");
    pv = doubles(logits ? at::_softmax(var_probs.reshape({-1}), 0, false) : var_probs, k, "var_probs");
    for (int64_t s : slots) {
      TORCH_CHECK(s >= kIn && s <= kBn, "switch_norm: terms are 0 (IN), 1 (LN) or 2 (BN)");
      has_ln |= s == kLn;
      has_bn |= s == kBn;
    }
    weight = doubles(w, c, "weight");
    if (has_bn && training) {
      TORCH_CHECK(group >= 1 && n % group == 0, "switch_norm: the batch of ", n, " does not split into groups of ",
                  group);
    } else if (has_bn) {
      TORCH_CHECK(rm.has_value() && rv.has_value(), "switch_norm: eval with a BN term needs the running buffers");
      running_mean = doubles(*rm, c, "running_mean");
      running_var = doubles(*rv, c, "running_var");
    }
  }
  int64_t groups() const { return training ? n / group : 1; }
};

// The statistics every term derives from the IN statistics, (N, C) mixtures included.
struct Statistics {
  std::vector<double> mean_ln, var_ln;  // (N)
  std::vector<double> mean_bn, var_bn;  // (G, C): each group's, in training (eval reads the running buffers)
  std::vector<double> mu, sigma2;       // (N, C)

  double mean_of(const Mixing& m, int64_t slot, int64_t n, int64_t c, const double* mean_in) const {
    if (slot == kIn) return mean_in[n * m.c + c];
    if (slot == kLn) return mean_ln[n];
    return bn_mean(m)[bn_row(m, n) * m.c + c];
  }
  double var_of(const Mixing& m, int64_t slot, int64_t n, int64_t c, const double* var_in) const {
    if (slot == kIn) return var_in[n * m.c + c];
    if (slot == kLn) return var_ln[n];
    return bn_var(m)[bn_row(m, n) * m.c + c];
  }
  // The BN statistics: the groups' in training, the running buffers (held by the Mixing) in eval.
  const double* bn_mean(const Mixing& m) const { return m.training ? mean_bn.data() : m.running_mean.data(); }
  const double* bn_var(const Mixing& m) const { return m.training ? var_bn.data() : m.running_var.data(); }
  static int64_t bn_row(const Mixing& m, int64_t n) { return m.training ? n / m.group : 0; }
};

// Pooled statistics in the cancellation-free form mean(var) + mean((mean - pooled mean)^2).
// Into `s`, whose vectors keep their capacity: a caller that takes sample after sample allocates once.
inline void fill_statistics(const Mixing& m, const double* mean_in, const double* var_in, Statistics& s) {
  const int64_t n = m.n, c = m.c;
  if (m.has_ln) {
    s.mean_ln.assign(n, 0);
    s.var_ln.assign(n, 0);
    for (int64_t i = 0; i < n; ++i) {
      const double* mi = mean_in + i * c;
      const double* vi = var_in + i * c;
      double sum = 0, spread = 0;
      for (int64_t j = 0; j < c; ++j) sum += mi[j];
      const double mean = sum / double(c);
      for (int64_t j = 0; j < c; ++j) spread += vi[j] + (mi[j] - mean) * (mi[j] - mean);
      s.mean_ln[i] = mean;
      s.var_ln[i] = spread / double(c);
    }
  }
  if (m.has_bn && m.training) {
    const int64_t groups = m.groups(), k = m.group;
    s.mean_bn.assign(groups * c, 0);
    s.var_bn.assign(groups * c, 0);
    for (int64_t g = 0; g < groups; ++g) {
      double* mb = s.mean_bn.data() + g * c;
      double* vb = s.var_bn.data() + g * c;
      for (int64_t i = g * k; i < (g + 1) * k; ++i)
        for (int64_t j = 0; j < c; ++j) mb[j] += mean_in[i * c + j];
      for (int64_t j = 0; j < c; ++j) mb[j] /= double(k);
      for (int64_t i = g * k; i < (g + 1) * k; ++i)
        for (int64_t j = 0; j < c; ++j) {
          const double d = mean_in[i * c + j] - mb[j];
          vb[j] += var_in[i * c + j] + d * d;
        }
      for (int64_t j = 0; j < c; ++j) vb[j] /= double(k);
    }
  }
  s.mu.assign(n * c, 0);
  s.sigma2.assign(n * c, 0);
  for (size_t t = 0; t < m.slots.size(); ++t) {
    const int64_t slot = m.slots[t];
    const double pm = m.pm[t], pv = m.pv[t];
    for (int64_t i = 0; i < n; ++i) {
      double* __restrict mu = s.mu.data() + i * c;
      double* __restrict sigma2 = s.sigma2.data() + i * c;
      if (slot == kLn) {
        const double mean = pm * s.mean_ln[i], var = pv * s.var_ln[i];
        for (int64_t j = 0; j < c; ++j) {
          mu[j] += mean;
          sigma2[j] += var;
        }
        continue;
      }
      const double* __restrict mean = slot == kIn ? mean_in + i * c : s.bn_mean(m) + Statistics::bn_row(m, i) * c;
      const double* __restrict var = slot == kIn ? var_in + i * c : s.bn_var(m) + Statistics::bn_row(m, i) * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        mu[j] += pm * mean[j];
        sigma2[j] += pv * var[j];
      }
    }
  }
}

inline Statistics statistics(const Mixing& m, const double* mean_in, const double* var_in) {
  Statistics s;
  fill_statistics(m, mean_in, var_in, s);
  return s;
}

// The buffers' update from the groups' statistics (G, C): the mean over groups of the update each group would give
// (a moving average whose momentum weighs the old value, or in batch-average mode the sums of mean and E[x^2]).
// Written in place element by element (the update of a small layer as tensor operations is a dozen dispatched calls,
// more than its statistics cost), with the buffers' version bumped as an in-place operation bumps it (where they
// have one).
inline void update_running(Tensor& rm, Tensor& rv, const Statistics& s, const Mixing& m, double momentum,
                           bool moving_average) {
  const int64_t groups = m.groups(), c = m.c;
  std::vector<double> mean(c, 0.0), second(c, 0.0);  // the groups' mean of mean_bn, and of var_bn or E[x^2]
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t j = 0; j < c; ++j) {
      const double mb = s.mean_bn[g * c + j], vb = s.var_bn[g * c + j];
      mean[j] += mb;
      second[j] += moving_average ? vb : mb * mb + vb;
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    mean[j] /= double(groups);
    second[j] /= double(groups);
  }
  for (Tensor* buffer : {&rm, &rv}) {
    TORCH_CHECK(buffer->numel() == c && buffer->is_contiguous() && buffer->is_floating_point(),
                "switch_norm: the running buffers must be contiguous floating tensors of ", c, " values");
    const std::vector<double>& update = buffer == &rm ? mean : second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, buffer->scalar_type(), "update_running", [&] {
      scalar_t* p = buffer->data_ptr<scalar_t>();
      for (int64_t j = 0; j < c; ++j) {
        const double old = double(load(p[j]));
        p[j] = from_double<scalar_t>(moving_average ? old * momentum + (1 - momentum) * update[j] : old + update[j]);
      }
    });
    if (!buffer->is_inference()) buffer->unsafeGetTensorImpl()->bump_version();  // inference tensors keep no version
  }
}

// y = (x - centre) * a + (bias - (mu - centre) * a), a = weight / sqrt(sigma2 + eps), for samples [n0, n1).
template <typename A>
void scale_and_shift(const Mixing& m, const Statistics& s, const std::vector<double>& bias, int64_t n0, int64_t n1,
                     double eps, const A* centre, A* scale, A* shift) {
  const double* __restrict weight = m.weight.data();
  const double* __restrict b = bias.data();
  for (int64_t i = n0; i < n1; ++i) {
    const int64_t r0 = i * m.c;
#pragma omp simd
    for (int64_t j = 0; j < m.c; ++j) {
      const double a = weight[j] / std::sqrt(s.sigma2[r0 + j] + eps);
      scale[r0 + j] = A(a);
      shift[r0 + j] = A(b[j] - (s.mu[r0 + j] - double(centre[r0 + j])) * a);
    }
  }
}

}  // namespace snzoo_cpu
