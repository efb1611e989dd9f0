// Switchable normalisation on the CPU: the full-size passes of the forward and the backward, for training and
// eval. Registered as torch.ops.snzoo.*; built on first use by snzoo/nn/cpu_kernels.py with the machine's compiler.
//
// x is viewed without a copy as (N, C, L) rows (contiguous input) or as (N, L, C) (channels innermost: channels_last
// and channels_last_3d), L >= 2, in float32, float64, bfloat16 or float16. Half-precision values are read and written
// in their own dtype and computed in float32; nothing full-size is copied.
//
// - sn_moments(x) -> (mean, var, centre): per-(n, c) IN mean and unbiased variance (float64) in one read from
//   memory: x goes in parts of about kChunk values, each read twice while it is in the core's cache (its mean m,
//   then d = x - m, whose sums correct m and give the squared deviations without cancellation, so that a large
//   mean costs no precision), and the parts combine exactly in float64. centre = the mean rounded to the compute
//   dtype: the forward's output and the backward are taken relative to it.
// - sn_apply(x, centre, scale, shift) -> y = (x - centre) * scale + shift, per (n, c), in x's dtype and layout.
// - sn_grad_sums(g, x, centre) -> (sum_L g, sum_L g * (x - centre)) per (n, c), float64, one read of g and x.
// - sn_grad_input(g, x, centre, a, b, c) -> dx = g * a + (x - centre) * b + c per (n, c), in x's dtype and layout.
// - switch_norm_eval(x, weight, bias, mean_probs, var_probs, running_mean?, running_var?, eps) -> y: eval-mode SN in
//   one call (the mixing of the IN, LN and running BN statistics done here, in float64). When one sample exceeds the
//   per-core caches, the samples go one at a time (statistics, then output), so that the second read of a sample
//   finds it in the shared cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kChunk = 2048;           // values summed in the compute dtype before a float64 accumulation
constexpr int64_t kTaskValues = 1 << 15;   // values a parallel task handles, at least
constexpr int64_t kSampleAtOnceBytes = int64_t(1) << 20;

// ------------------------------------------------------------------------------------------------ dtypes
template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(c10::Half v) { return float(v); }
// bfloat16 is the top half of a float32: a shift, which vectorises (c10's conversion goes through a union).
inline float load(c10::BFloat16 v) {
  const uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline T store(typename Compute<T>::type v) {
  return T(v);
}
// Round to nearest even, NaN kept a (quiet) NaN: c10's rounding, written without a branch so that it vectorises.
template <>
inline c10::BFloat16 store<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
  return out;
}

// ------------------------------------------------------------------------------------------------ layout
struct View {
  int64_t n, c, l;
  bool nlc;  // channels innermost: element (n, c, l) at (n * L + l) * C + c; else at (n * C + c) * L + l
};

View view_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 3, op, ": x must have at least 3 dimensions (N, C, *)");
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(n > 0 && c > 0, op, ": x must not be empty");
  const int64_t l = x.numel() / (n * c);
  TORCH_CHECK(l >= 2, op, ": needs at least 2 values per (sample, channel)");
  if (x.is_contiguous()) return {n, c, l, false};
  TORCH_CHECK(x.movedim(1, -1).is_contiguous(), op, ": x must be contiguous or channels_last");
  return {n, c, l, true};
}

void same_layout(const at::Tensor& t, const at::Tensor& x, const char* op, const char* what) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides() && t.scalar_type() == x.scalar_type(), op, ": ",
              what, " must have x's shape, strides and dtype");
}

template <typename A>
const A* per_row(const at::Tensor& t, const View& v, const char* op, const char* what) {
  TORCH_CHECK(t.numel() == v.n * v.c && t.is_contiguous() && t.scalar_type() == c10::CppTypeToScalarType<A>::value,
              op, ": ", what, " must be contiguous (N, C) in the compute dtype");
  return t.data_ptr<A>();
}

// (N, L, C) work in tasks of (sample, block of up to kChannelBlock channels, segment of rows), about kTaskValues
// values each, so that there are tasks for every thread at batch 1 too; inside a task, rows go in groups of about kChunk values, summed in the
// compute dtype (vectorised over the channels) and then accumulated in float64.
constexpr int64_t kChannelBlock = 64;
constexpr int64_t kGroupRows = 256;

struct NlcTasks {
  int64_t block, blocks, segments, segment_rows, group_rows;
  explicit NlcTasks(const View& v) {
    block = std::min(v.c, kChannelBlock);
    blocks = (v.c + block - 1) / block;
    group_rows = std::clamp<int64_t>(kChunk / block, 1, kGroupRows);
    // from the sizes alone, not the thread count: results must not depend on how many threads run
    segments = std::clamp<int64_t>(v.l * block / kTaskValues, 1, std::max<int64_t>(1, v.l / (4 * group_rows)));
    segment_rows = (v.l + segments - 1) / segments;
  }
  int64_t count(const View& v) const { return v.n * blocks * segments; }
  // task -> sample, first channel, channel count, segment, first row, end row
  void unpack(const View& v, int64_t task, int64_t& n, int64_t& c0, int64_t& width, int64_t& segment, int64_t& l0,
              int64_t& l1) const {
    segment = task % segments;
    const int64_t rest = task / segments;
    c0 = (rest % blocks) * block;
    n = rest / blocks;
    width = std::min(block, v.c - c0);
    l0 = segment * segment_rows;
    l1 = std::min(v.l, l0 + segment_rows);
  }
};

// out = (x - m) * b + c, plus g * a when kWithGrad, with per-(n, c) coefficients, in x's layout. The coefficients of
// a row are hoisted into registers (NCL) and every pointer is restrict, so that the inner loops vectorise.
template <typename T, bool kWithGrad>
void affine_pass(const T* __restrict x, const T* __restrict g, T* __restrict out, const View& v,
                 const typename Compute<T>::type* __restrict m, const typename Compute<T>::type* __restrict a,
                 const typename Compute<T>::type* __restrict b, const typename Compute<T>::type* __restrict c) {
  using A = typename Compute<T>::type;
  if (!v.nlc) {
    at::parallel_for(0, v.n * v.c, std::max<int64_t>(1, kTaskValues / v.l), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const A mr = m[r], ar = kWithGrad ? a[r] : A(0), br = b[r], cr = c[r];
        const T* __restrict xr = x + r * v.l;
        const T* __restrict gr = kWithGrad ? g + r * v.l : nullptr;
        T* __restrict yr = out + r * v.l;
#pragma omp simd
        for (int64_t l = 0; l < v.l; ++l) {
          A value = (load(xr[l]) - mr) * br + cr;
          if (kWithGrad) value += load(gr[l]) * ar;
          yr[l] = store<T>(value);
        }
      }
    });
    return;
  }
  at::parallel_for(0, v.n * v.l, std::max<int64_t>(1, kTaskValues / v.c), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t first = (row / v.l) * v.c;
      const A* __restrict mn = m + first;
      const A* __restrict an = kWithGrad ? a + first : nullptr;
      const A* __restrict bn = b + first;
      const A* __restrict cn = c + first;
      const T* __restrict xr = x + row * v.c;
      const T* __restrict gr = kWithGrad ? g + row * v.c : nullptr;
      T* __restrict yr = out + row * v.c;
#pragma omp simd
      for (int64_t ch = 0; ch < v.c; ++ch) {
        A value = (load(xr[ch]) - mn[ch]) * bn[ch] + cn[ch];
        if (kWithGrad) value += load(gr[ch]) * an[ch];
        yr[ch] = store<T>(value);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------ moments
// Count, mean and sum of squared deviations of a part of a row; parts combine exactly (Chan et al.), so each part
// is read from memory once: its two passes (mean, then centred squares) run while it is in the core's cache.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void add(double count_b, double mean_b, double m2_b) {
    const double total = count + count_b, delta = mean_b - mean;
    mean += delta * (count_b / total);
    m2 += m2_b + delta * delta * (count * count_b / total);
    count = total;
  }
};

// The part's first pass gives its rounded mean m; the second sums d = x - m and d^2, which corrects m and gives the
// squared deviations without cancellation: mean = m + sum d / k, m2 = sum d^2 - (sum d)^2 / k.
template <typename T>
Moments chunk_moments(const T* x, int64_t count) {
  using A = typename Compute<T>::type;
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += load(x[i]);
  const A m = sum / A(count);
  A squares = 0, residue = 0;
#pragma omp simd reduction(+ : squares, residue)
  for (int64_t i = 0; i < count; ++i) {
    const A d = load(x[i]) - m;
    squares += d * d;
    residue += d;
  }
  const double k = double(count), res = residue;
  return {k, double(m) + res / k, double(squares) - res * res / k};
}

template <typename T>
void moments(const T* x, const View& v, typename Compute<T>::type* centre, double* mean, double* var) {
  using A = typename Compute<T>::type;
  auto finish = [&](int64_t r, const Moments& mo) {
    mean[r] = mo.mean;
    var[r] = mo.m2 / double(v.l - 1);
    centre[r] = A(mo.mean);
  };
  if (!v.nlc) {
    at::parallel_for(0, v.n * v.c, std::max<int64_t>(1, kTaskValues / v.l), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        Moments mo;
        for (int64_t start = 0; start < v.l; start += kChunk) {
          const int64_t count = std::min(kChunk, v.l - start);
          const Moments part = chunk_moments(x + r * v.l + start, count);
          mo.add(part.count, part.mean, part.m2);
        }
        finish(r, mo);
      }
    });
    return;
  }
  // (N, L, C): each task combines the moments of its groups of rows per channel, then the segments of each sample
  // are combined.
  const NlcTasks tasks(v);
  std::vector<Moments> partial(v.n * tasks.segments * v.c);
  at::parallel_for(0, tasks.count(v), 1, [&](int64_t begin, int64_t end) {
    A sum[kChannelBlock], squares[kChannelBlock], residue[kChannelBlock];
    Moments acc[kChannelBlock];
    for (int64_t task = begin; task < end; ++task) {
      int64_t n, c0, width, segment, l0, l1;
      tasks.unpack(v, task, n, c0, width, segment, l0, l1);
      for (int64_t c = 0; c < width; ++c) acc[c] = Moments();
      for (int64_t g0 = l0; g0 < l1; g0 += tasks.group_rows) {
        const int64_t g1 = std::min(l1, g0 + tasks.group_rows);
        const A count = A(g1 - g0);
        for (int64_t c = 0; c < width; ++c) sum[c] = squares[c] = residue[c] = A(0);
        for (int64_t l = g0; l < g1; ++l) {
          const T* __restrict row = x + (n * v.l + l) * v.c + c0;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) sum[c] += load(row[c]);
        }
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) sum[c] /= count;
        for (int64_t l = g0; l < g1; ++l) {
          const T* __restrict row = x + (n * v.l + l) * v.c + c0;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) {
            const A d = load(row[c]) - sum[c];
            squares[c] += d * d;
            residue[c] += d;
          }
        }
        const double k = double(count);
        for (int64_t c = 0; c < width; ++c) {
          const double res = residue[c];
          acc[c].add(k, double(sum[c]) + res / k, double(squares[c]) - res * res / k);
        }
      }
      for (int64_t c = 0; c < width; ++c) partial[(n * tasks.segments + segment) * v.c + c0 + c] = acc[c];
    }
  });
  for (int64_t n = 0; n < v.n; ++n) {
    for (int64_t c = 0; c < v.c; ++c) {
      Moments mo;
      for (int64_t segment = 0; segment < tasks.segments; ++segment) {
        const Moments& part = partial[(n * tasks.segments + segment) * v.c + c];
        mo.add(part.count, part.mean, part.m2);
      }
      finish(n * v.c + c, mo);
    }
  }
}

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

// ------------------------------------------------------------------------------------------------ apply
template <typename T>
void apply(const T* x, T* y, const View& v, const typename Compute<T>::type* centre,
           const typename Compute<T>::type* scale, const typename Compute<T>::type* shift) {
  affine_pass<T, false>(x, nullptr, y, v, centre, nullptr, scale, shift);
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

// ------------------------------------------------------------------------------------------------ backward
// Per (n, c): sum g and sum g * (x - m), in float64 out of compute-dtype partial sums of about kChunk values.
template <typename T>
void grad_sums(const T* __restrict g, const T* __restrict x, const View& v, const typename Compute<T>::type* m,
               double* sum_g, double* sum_gd) {
  using A = typename Compute<T>::type;
  if (!v.nlc) {
    at::parallel_for(0, v.n * v.c, std::max<int64_t>(1, kTaskValues / v.l), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const A mr = m[r];
        double total_g = 0, total_gd = 0;
        for (int64_t start = 0; start < v.l; start += kChunk) {
          const T* __restrict gr = g + r * v.l + start;
          const T* __restrict xr = x + r * v.l + start;
          const int64_t count = std::min(kChunk, v.l - start);
          A part_g = 0, part_gd = 0;
#pragma omp simd reduction(+ : part_g, part_gd)
          for (int64_t l = 0; l < count; ++l) {
            const A gl = load(gr[l]);
            part_g += gl;
            part_gd += gl * (load(xr[l]) - mr);
          }
          total_g += part_g;
          total_gd += part_gd;
        }
        sum_g[r] = total_g;
        sum_gd[r] = total_gd;
      }
    });
    return;
  }
  const NlcTasks tasks(v);
  std::vector<double> partial_g(v.n * tasks.segments * v.c), partial_gd(v.n * tasks.segments * v.c);
  at::parallel_for(0, tasks.count(v), 1, [&](int64_t begin, int64_t end) {
    A part_g[kChannelBlock], part_gd[kChannelBlock];
    double total_g[kChannelBlock], total_gd[kChannelBlock];
    for (int64_t task = begin; task < end; ++task) {
      int64_t n, c0, width, segment, l0, l1;
      tasks.unpack(v, task, n, c0, width, segment, l0, l1);
      const A* __restrict mn = m + n * v.c + c0;
      for (int64_t c = 0; c < width; ++c) total_g[c] = total_gd[c] = 0;
      for (int64_t g0 = l0; g0 < l1; g0 += tasks.group_rows) {
        const int64_t g1 = std::min(l1, g0 + tasks.group_rows);
        for (int64_t c = 0; c < width; ++c) part_g[c] = part_gd[c] = A(0);
        for (int64_t l = g0; l < g1; ++l) {
          const T* __restrict gr = g + (n * v.l + l) * v.c + c0;
          const T* __restrict xr = x + (n * v.l + l) * v.c + c0;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) {
            const A gl = load(gr[c]);
            part_g[c] += gl;
            part_gd[c] += gl * (load(xr[c]) - mn[c]);
          }
        }
        for (int64_t c = 0; c < width; ++c) {
          total_g[c] += part_g[c];
          total_gd[c] += part_gd[c];
        }
      }
      for (int64_t c = 0; c < width; ++c) {
        partial_g[(n * tasks.segments + segment) * v.c + c0 + c] = total_g[c];
        partial_gd[(n * tasks.segments + segment) * v.c + c0 + c] = total_gd[c];
      }
    }
  });
  for (int64_t n = 0; n < v.n; ++n) {
    for (int64_t c = 0; c < v.c; ++c) {
      double total1 = 0, total2 = 0;
      for (int64_t segment = 0; segment < tasks.segments; ++segment) {
        total1 += partial_g[(n * tasks.segments + segment) * v.c + c];
        total2 += partial_gd[(n * tasks.segments + segment) * v.c + c];
      }
      sum_g[n * v.c + c] = total1;
      sum_gd[n * v.c + c] = total2;
    }
  }
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

// ------------------------------------------------------------------------------------------------ eval
struct Mixing {
  double pm[3];  // IN, LN, BN
  double pv[3];
  const double* running_mean;  // (C) or nullptr when there is no BN term
  const double* running_var;
  const double* weight;  // (C)
  const double* bias;
  double eps;
};

// Per-(n, c) scale and shift of rows [row_begin, row_end) (whole samples) from their IN statistics.
template <typename A>
void eval_scale_shift(const Mixing& mix, int64_t channels, int64_t row_begin, int64_t row_end, const A* centre,
                      const double* mean, const double* var, A* scale, A* shift) {
  for (int64_t n0 = row_begin; n0 < row_end; n0 += channels) {
    const double* m = mean + n0;
    const double* s = var + n0;
    double sum = 0, spread = 0;
    for (int64_t c = 0; c < channels; ++c) sum += m[c];
    const double mean_ln = sum / double(channels);
    for (int64_t c = 0; c < channels; ++c) spread += s[c] + (m[c] - mean_ln) * (m[c] - mean_ln);
    const double var_ln = spread / double(channels);
    for (int64_t c = 0; c < channels; ++c) {
      double mu = mix.pm[0] * m[c] + mix.pm[1] * mean_ln;
      double sigma2 = mix.pv[0] * s[c] + mix.pv[1] * var_ln;
      if (mix.running_mean != nullptr) {
        mu += mix.pm[2] * mix.running_mean[c];
        sigma2 += mix.pv[2] * mix.running_var[c];
      }
      const double a = mix.weight[c] / std::sqrt(sigma2 + mix.eps);
      scale[n0 + c] = A(a);
      shift[n0 + c] = A(mix.bias[c] - (mu - double(centre[n0 + c])) * a);
    }
  }
}

template <typename T>
void eval_forward(const T* x, T* y, const View& v, const Mixing& mix) {
  using A = typename Compute<T>::type;
  const int64_t rows = v.n * v.c;
  std::vector<A> centre(rows), scale(rows), shift(rows);
  std::vector<double> mean(rows), var(rows);
  auto sample_range = [&](int64_t first, int64_t count) {
    const int64_t offset = first * v.c * v.l;
    const View part{count, v.c, v.l, v.nlc};
    const int64_t r0 = first * v.c;
    moments<T>(x + offset, part, centre.data() + r0, mean.data() + r0, var.data() + r0);
    eval_scale_shift<A>(mix, v.c, 0, count * v.c, centre.data() + r0, mean.data() + r0, var.data() + r0,
                        scale.data() + r0, shift.data() + r0);
    apply<T>(x + offset, y + offset, part, centre.data() + r0, scale.data() + r0, shift.data() + r0);
  };
  if (v.c * v.l * int64_t(sizeof(T)) >= kSampleAtOnceBytes) {
    for (int64_t n = 0; n < v.n; ++n) sample_range(n, 1);
  } else {
    sample_range(0, v.n);
  }
}

const double* per_channel(const c10::optional<at::Tensor>& t, const View& v, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == v.c && t->is_contiguous() && t->scalar_type() == at::kDouble,
              "switch_norm_eval: ", what, " must be contiguous float64, one value per channel");
  return t->data_ptr<double>();
}

at::Tensor switch_norm_eval(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            at::ArrayRef<double> mean_probs, at::ArrayRef<double> var_probs,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, double eps) {
  const View v = view_of(x, "switch_norm_eval");
  TORCH_CHECK(mean_probs.size() == 3 && var_probs.size() == 3, "switch_norm_eval: probabilities are (IN, LN, BN)");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "switch_norm_eval: give both running buffers or neither");
  Mixing mix{{mean_probs[0], mean_probs[1], mean_probs[2]},
             {var_probs[0], var_probs[1], var_probs[2]},
             per_channel(running_mean, v, "running_mean"),
             per_channel(running_var, v, "running_var"),
             per_channel(weight, v, "weight"),
             per_channel(bias, v, "bias"),
             eps};
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "switch_norm_eval", [&] {
    eval_forward<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), v, mix);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(snzoo, m) {
  m.def("sn_moments(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("sn_apply(Tensor x, Tensor centre, Tensor scale, Tensor shift) -> Tensor");
  m.def("sn_grad_sums(Tensor g, Tensor x, Tensor centre) -> (Tensor, Tensor)");
  m.def("sn_grad_input(Tensor g, Tensor x, Tensor centre, Tensor a, Tensor b, Tensor c) -> Tensor");
  m.def(
      "switch_norm_eval(Tensor x, Tensor weight, Tensor bias, float[] mean_probs, float[] var_probs, "
      "Tensor? running_mean, Tensor? running_var, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(snzoo, CPU, m) {
  m.impl("sn_moments", &sn_moments);
  m.impl("sn_apply", &sn_apply);
  m.impl("sn_grad_sums", &sn_grad_sums);
  m.impl("sn_grad_input", &sn_grad_input);
  m.impl("switch_norm_eval", &switch_norm_eval);
}
