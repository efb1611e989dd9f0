// Eval-mode switchable normalisation on the CPU in two passes over the data: per-(sample, channel) statistics,
// then one multiply-add per element. Registered as torch.ops.snzoo.switch_norm_eval; built on first use by
// snzoo/nn/cpu_kernels.py with the machine's compiler.
//
// x is contiguous (N, C, L), L >= 2. Statistics: IN mean and unbiased variance of each row in the row's dtype, two
// passes over the row while it is in cache, the second corrected by the rounding of the first mean
// (var = (sum d^2 - (sum d)^2 / L) / (L - 1), d = x - mean), so that a large mean does not cancel; everything
// after that in double. LN: mean of the IN means, mean of (var_in + (mean_in - mean_ln)^2) over C. BN: the
// running buffers. mu = sum_k pm_k mean_k, sigma2 = sum_k pv_k var_k (k = IN, LN, BN), a = weight / sqrt(sigma2 + eps),
// y = (x - m) * a + (b - (mu - m) * a) with m the row's mean rounded to x's dtype: x - m is exact where x is close
// to m, so a large mean against a small spread costs no precision (x * a + (b - mu * a) would cancel there).
// When one sample's rows exceed the per-core caches, the samples go one at a time (statistics, then output), so
// that the second read of a sample finds it in the shared cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <memory>

namespace {

constexpr int64_t kSampleAtOnceBytes = int64_t(1) << 20;
constexpr int64_t kRowsPerTask = 16;

template <typename T>
void row_stats(const T* x, int64_t row_begin, int64_t row_end, int64_t length, T* centre, double* mean, double* var) {
  at::parallel_for(row_begin, row_end, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * length;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t l = 0; l < length; ++l) sum += row[l];
      const T m = sum / T(length);
      T squares = 0, residue = 0;
#pragma omp simd reduction(+ : squares, residue)
      for (int64_t l = 0; l < length; ++l) {
        const T d = row[l] - m;
        squares += d * d;
        residue += d;
      }
      const double res = residue;
      centre[r] = m;
      mean[r] = double(m) + res / double(length);
      var[r] = (double(squares) - res * res / double(length)) / double(length - 1);
    }
  });
}

template <typename T>
struct Mixing {
  double pm[3];  // IN, LN, BN
  double pv[3];
  const T* running_mean;  // (C) or nullptr when there is no BN term
  const T* running_var;
  const T* weight;  // (C)
  const T* bias;
  double eps;
};

// LN statistics of sample n from its rows' IN statistics.
void layer_stats(int64_t n, int64_t channels, const double* mean, const double* var, double* mean_ln, double* var_ln) {
  const double* m = mean + n * channels;
  const double* v = var + n * channels;
  double sum = 0, spread = 0;
  for (int64_t c = 0; c < channels; ++c) sum += m[c];
  const double centre = sum / double(channels);
  for (int64_t c = 0; c < channels; ++c) spread += v[c] + (m[c] - centre) * (m[c] - centre);
  mean_ln[n] = centre;
  var_ln[n] = spread / double(channels);
}

// The output of rows [row_begin, row_end): each row's scale and shift from the mixed statistics, then one pass.
template <typename T>
void row_output(const T* x, T* y, int64_t row_begin, int64_t row_end, int64_t channels, int64_t length,
                const T* centre, const double* mean, const double* var, const double* mean_ln, const double* var_ln,
                const Mixing<T>& mix) {
  at::parallel_for(row_begin, row_end, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / channels, c = r % channels;
      double mu = mix.pm[0] * mean[r] + mix.pm[1] * mean_ln[n];
      double sigma2 = mix.pv[0] * var[r] + mix.pv[1] * var_ln[n];
      if (mix.running_mean != nullptr) {
        mu += mix.pm[2] * double(mix.running_mean[c]);
        sigma2 += mix.pv[2] * double(mix.running_var[c]);
      }
      const double scale = double(mix.weight[c]) / std::sqrt(sigma2 + mix.eps);
      const T m = centre[r], a = T(scale), b = T(double(mix.bias[c]) - (mu - double(m)) * scale);
      const T* in = x + r * length;
      T* out = y + r * length;
#pragma omp simd
      for (int64_t l = 0; l < length; ++l) out[l] = (in[l] - m) * a + b;
    }
  });
}

template <typename T>
void forward(const T* x, T* y, int64_t batch, int64_t channels, int64_t length, const Mixing<T>& mix) {
  const int64_t rows = batch * channels;
  // uninitialised buffers: every element is written before it is read
  std::unique_ptr<T[]> centre(new T[rows]);
  std::unique_ptr<double[]> mean(new double[rows]), var(new double[rows]);
  std::unique_ptr<double[]> mean_ln(new double[batch]), var_ln(new double[batch]);
  auto stats = [&](int64_t begin, int64_t end) { row_stats(x, begin, end, length, centre.get(), mean.get(), var.get()); };
  auto layer = [&](int64_t n) { layer_stats(n, channels, mean.get(), var.get(), mean_ln.get(), var_ln.get()); };
  auto output = [&](int64_t begin, int64_t end) {
    row_output(x, y, begin, end, channels, length, centre.get(), mean.get(), var.get(), mean_ln.get(), var_ln.get(), mix);
  };
  if (channels * length * int64_t(sizeof(T)) >= kSampleAtOnceBytes) {
    for (int64_t n = 0; n < batch; ++n) {
      stats(n * channels, (n + 1) * channels);
      layer(n);
      output(n * channels, (n + 1) * channels);
    }
    return;
  }
  stats(0, rows);
  for (int64_t n = 0; n < batch; ++n) layer(n);
  output(0, rows);
}

const at::Tensor& per_channel(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.numel() == x.size(1) && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
              "switch_norm_eval: ", what, " must be contiguous, one value per channel, in x's dtype");
  return t;
}

at::Tensor switch_norm_eval(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            at::ArrayRef<double> mean_probs, at::ArrayRef<double> var_probs,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, double eps) {
  TORCH_CHECK(x.dim() >= 3 && x.is_contiguous(), "switch_norm_eval: x must be contiguous with >= 3 dims");
  TORCH_CHECK(mean_probs.size() == 3 && var_probs.size() == 3, "switch_norm_eval: probabilities are (IN, LN, BN)");
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t length = batch * channels == 0 ? 0 : x.numel() / (batch * channels);
  TORCH_CHECK(length >= 2, "switch_norm_eval: needs at least 2 values per (sample, channel)");
  const bool with_bn = running_mean.has_value() && running_var.has_value();
  per_channel(weight, x, "weight");
  per_channel(bias, x, "bias");
  if (with_bn) {
    per_channel(*running_mean, x, "running_mean");
    per_channel(*running_var, x, "running_var");
  }
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "switch_norm_eval", [&] {
    Mixing<scalar_t> mix{{mean_probs[0], mean_probs[1], mean_probs[2]},
                         {var_probs[0], var_probs[1], var_probs[2]},
                         with_bn ? running_mean->data_ptr<scalar_t>() : nullptr,
                         with_bn ? running_var->data_ptr<scalar_t>() : nullptr,
                         weight.data_ptr<scalar_t>(),
                         bias.data_ptr<scalar_t>(),
                         eps};
    forward<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), batch, channels, length, mix);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(snzoo, m) {
  m.def(
      "switch_norm_eval(Tensor x, Tensor weight, Tensor bias, float[] mean_probs, float[] var_probs, "
      "Tensor? running_mean, Tensor? running_var, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(snzoo, CPU, m) { m.impl("switch_norm_eval", &switch_norm_eval); }
