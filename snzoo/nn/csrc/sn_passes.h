// The full-size passes of switchable normalisation on the CPU, shared by the operators of switch_norm_cpu.cpp.
//
// x is viewed without a copy as (N, C, L) rows (contiguous input) or as (N, L, C) (channels innermost: channels_last
// and channels_last_3d), L >= 2, in float32, float64, bfloat16 or float16. Half-precision values are read and written
// in their own dtype and computed in float32 (the "compute dtype"); nothing full-size is copied. Every pass splits its
// work from the shapes alone, never from the thread count, so that results do not depend on how many threads run.
//
// - moments: per-(n, c) IN mean and unbiased variance (float64) in one read from memory: x goes in parts of about
//   kChunk values, each read twice while it is in the core's cache (its mean m, then d = x - m, whose sums correct m
//   and give the squared deviations without cancellation, so that a large mean costs no precision), and the parts
//   combine exactly in float64; centre = the mean rounded to the compute dtype.
// - affine_pass: out = (x - m) * b + c (+ g * a), per (n, c).
// - grad_sums (sn_grad_passes.h): sum_L g and sum_L g * (x - m) per (n, c), float64, one read of g and x.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace snzoo_cpu {
constexpr int64_t kChunk = 2048;           // values summed in the compute dtype before a float64 accumulation
constexpr int64_t kTaskValues = 1 << 15;   // values a parallel task handles, at least
constexpr int64_t kSampleAtOnceBytes = int64_t(1) << 20;

// GCC vectorises with 256-bit registers by default even where the CPU has 512-bit ones (as PyTorch's own kernels use
// here). The long loops run inside wide_vectors, compiled to prefer 512-bit vectors: the loop body, a lambda, is
// inlined into it. Short rows keep the default: a 512-bit loop over 49 values spends its time in the remainder.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define SNZOO_WIDE_VECTORS __attribute__((target("prefer-vector-width=512"), noinline))
#define SNZOO_INLINE_BODY __attribute__((always_inline))
#else
#define SNZOO_WIDE_VECTORS
#define SNZOO_INLINE_BODY
#endif
template <typename F>
SNZOO_WIDE_VECTORS void wide_vectors(const F& body) {
  body();
}
// Rows of at least kWideRow values (contiguous input) or kWideChannels channels (channels innermost) take wide_vectors.
constexpr int64_t kWideRow = 256, kWideChannels = 16;

// body() inside wide_vectors where `wide`, else as it is.
template <typename F>
inline void vectorised(bool wide, const F& body) {
  if (wide) {
    wide_vectors(body);
  } else {
    body();
  }
}

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

// A float64 result in a tensor's dtype, rounded as a dtype conversion of torch rounds it (half types via float32).
template <typename T>
inline T from_double(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return T(float(v));
  }
}

// ------------------------------------------------------------------------------------------------ layout
struct View {
  int64_t n, c, l;
  bool nlc;  // channels innermost: element (n, c, l) at (n * L + l) * C + c; else at (n * C + c) * L + l
};

// True when x.movedim(1, -1) is contiguous (sizes of 1 have any stride), read from the strides: a movedim view is a
// dispatched call, a few microseconds on every layer call.
inline bool channels_innermost(const at::Tensor& x) {
  int64_t expected = 1;
  auto dense = [&](int64_t d) {
    if (x.size(d) == 1) return true;
    if (x.stride(d) != expected) return false;
    expected *= x.size(d);
    return true;
  };
  if (!dense(1)) return false;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (!dense(d)) return false;
  }
  return dense(0);
}

inline View view_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 3, op, ": x must have at least 3 dimensions (N, C, *)");
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(n > 0 && c > 0, op, ": x must not be empty");
  const int64_t l = x.numel() / (n * c);
  TORCH_CHECK(l >= 2, op, ": needs at least 2 values per (sample, channel)");
  if (x.is_contiguous()) return {n, c, l, false};
  TORCH_CHECK(channels_innermost(x), op, ": x must be contiguous or channels_last");
  return {n, c, l, true};
}

inline void same_layout(const at::Tensor& t, const at::Tensor& x, const char* op, const char* what) {
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
      auto rows = [&]() SNZOO_INLINE_BODY {
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
      };
      vectorised(v.l >= kWideRow, rows);
    });
    return;
  }
  at::parallel_for(0, v.n * v.l, std::max<int64_t>(1, kTaskValues / v.c), [&](int64_t begin, int64_t end) {
    // The rows of one sample share its coefficients: found once per sample, not per row (a row can be one vector).
    auto rows = [&]() SNZOO_INLINE_BODY {
      for (int64_t row = begin; row < end;) {
        const int64_t first = (row / v.l) * v.c, stop = std::min(end, (row / v.l + 1) * v.l);
        const A* __restrict mn = m + first;
        const A* __restrict an = kWithGrad ? a + first : nullptr;
        const A* __restrict bn = b + first;
        const A* __restrict cn = c + first;
        for (; row < stop; ++row) {
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
      }
    };
    vectorised(v.c >= kWideChannels, rows);
  });
}

// ------------------------------------------------------------------------------------------------ moments
// Count, mean and sum of squared deviations of a part of a row; parts combine exactly (Chan et al.), so each part
// is read from memory once: its two passes (mean, then centred squares) run while it is in the core's cache.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void add(double count_b, double mean_b, double m2_b) {
    if (count == 0) {  // the first part: nothing to combine (and no division, which short rows would pay for)
      count = count_b, mean = mean_b, m2 = m2_b;
      return;
    }
    add(count_b, mean_b, m2_b, count_b / (count + count_b));
  }
  // The same with share = count_b / (count + count_b) given: channels that see the same counts share one division.
  void add(double count_b, double mean_b, double m2_b, double share) {
    if (count == 0) {
      count = count_b, mean = mean_b, m2 = m2_b;
      return;
    }
    const double delta = mean_b - mean;
    mean += delta * share;
    m2 += m2_b + delta * delta * (count * share);
    count += count_b;
  }
};

// The part's first pass gives its rounded mean m; the second sums d = x - m and d^2, which corrects m and gives the
// squared deviations without cancellation: mean = m + sum d / k, m2 = sum d^2 - (sum d)^2 / k.
// m is only the centre of the second pass (the residue corrects it), so it may be rounded any way: it is taken with a
// multiplication by 1 / count, which the caller computes once for rows of equal length.
// Sums over a part run in kLanes independent lanes (several vector registers), added up in a fixed order at the
// end: one running sum would wait on the latency of every vector add, and would run at a fraction of the core's
// throughput. The order depends on the part alone, so results stay independent of the thread count.
constexpr int64_t kLanes = 64;

// The sum of the lanes, halved in a fixed tree (vector adds; a running scalar sum would be a chain of 64 adds).
template <typename A>
A fold_lanes(A* lanes) {
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

template <typename T>
Moments short_moments(const T* __restrict x, int64_t count, double inv_count) {
  using A = typename Compute<T>::type;
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += load(x[i]);
  const A m = sum * A(inv_count);
  A squares = 0, residue = 0;
#pragma omp simd reduction(+ : squares, residue)
  for (int64_t i = 0; i < count; ++i) {
    const A d = load(x[i]) - m;
    squares += d * d;
    residue += d;
  }
  const double res = residue;
  return {double(count), double(m) + res * inv_count, double(squares) - res * res * inv_count};
}

template <typename T>
Moments chunk_moments(const T* __restrict x, int64_t count, double inv_count) {
  using A = typename Compute<T>::type;
  if (count < 4 * kLanes) return short_moments(x, count, inv_count);  // too short for the lanes to pay off
  const int64_t whole = count / kLanes * kLanes;
  A m, squares, residue;
  wide_vectors([&]() SNZOO_INLINE_BODY {
    A lanes[kLanes] = {};
    for (int64_t i = 0; i < whole; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) lanes[j] += load(x[i + j]);
    }
    // The rest of the part (fewer than kLanes values) goes into the first lanes: one masked vector step, where a
    // scalar loop would cost as much as the vectorised part of a row of 784.
#pragma omp simd
    for (int64_t j = 0; j < count - whole; ++j) lanes[j] += load(x[whole + j]);
    m = fold_lanes(lanes) * A(inv_count);
    A square_lanes[kLanes] = {}, residue_lanes[kLanes] = {};
    for (int64_t i = 0; i < whole; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const A d = load(x[i + j]) - m;
        square_lanes[j] += d * d;
        residue_lanes[j] += d;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < count - whole; ++j) {
      const A d = load(x[whole + j]) - m;
      square_lanes[j] += d * d;
      residue_lanes[j] += d;
    }
    squares = fold_lanes(square_lanes);
    residue = fold_lanes(residue_lanes);
  });
  const double res = residue;
  return {double(count), double(m) + res * inv_count, double(squares) - res * res * inv_count};
}

template <typename T>
void moments(const T* x, const View& v, typename Compute<T>::type* centre, double* mean, double* var) {
  using A = typename Compute<T>::type;
  const double inv_l1 = 1.0 / double(v.l - 1);
  auto finish = [&](int64_t r, const Moments& mo) {
    mean[r] = mo.mean;
    var[r] = mo.m2 * inv_l1;
    centre[r] = A(mo.mean);
  };
  if (!v.nlc) {
    const int64_t last = (v.l - 1) / kChunk * kChunk;  // start of the last, possibly shorter, part of a row
    const double inv_full = 1.0 / double(std::min(kChunk, v.l)), inv_last = 1.0 / double(v.l - last);
    at::parallel_for(0, v.n * v.c, std::max<int64_t>(1, kTaskValues / v.l), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        Moments mo;
        for (int64_t start = 0; start < v.l; start += kChunk) {
          const int64_t count = std::min(kChunk, v.l - start);
          const Moments part = chunk_moments(x + r * v.l + start, count, start == last ? inv_last : inv_full);
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
    auto tasks_body = [&]() SNZOO_INLINE_BODY {
      A sum[kChannelBlock], squares[kChannelBlock], residue[kChannelBlock];
      A sum2[kChannelBlock], squares2[kChannelBlock], residue2[kChannelBlock];
      const T zeros[kChannelBlock] = {};  // the partner of an odd group's last row
      double acc_mean[kChannelBlock], acc_m2[kChannelBlock];  // the task's moments so far, per channel
      for (int64_t task = begin; task < end; ++task) {
        int64_t n, c0, width, segment, l0, l1;
        tasks.unpack(v, task, n, c0, width, segment, l0, l1);
        for (int64_t g0 = l0; g0 < l1; g0 += tasks.group_rows) {
          const int64_t g1 = std::min(l1, g0 + tasks.group_rows);
          const double k = double(g1 - g0), inv_k = 1.0 / k;
          const double share = k / (double(g0 - l0) + k);  // every channel of the task has seen g0 - l0 rows
          const A inv_count = A(inv_k);
          // Rows go in pairs, each row of a pair into its own sums (added at the end), so that two chains of vector
          // adds are in flight: with few channels a row is one vector, and one chain waits on every add's latency.
          for (int64_t c = 0; c < width; ++c) {
          sum[c] = squares[c] = residue[c] = sum2[c] = squares2[c] = residue2[c] = 0;
        }
          const int64_t paired = g0 + (g1 - g0) / 2 * 2;
          for (int64_t l = g0; l < g1; l += 2) {
            const T* __restrict row = x + (n * v.l + l) * v.c + c0;
            const T* __restrict next = l + 1 < g1 ? row + v.c : zeros;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) {
              sum[c] += load(row[c]);
              sum2[c] += load(next[c]);
            }
          }
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) sum[c] = (sum[c] + sum2[c]) * inv_count;  // the second pass's centre
          for (int64_t l = g0; l < paired; l += 2) {
            const T* __restrict row = x + (n * v.l + l) * v.c + c0;
            const T* __restrict next = row + v.c;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) {
              const A d = load(row[c]) - sum[c], e = load(next[c]) - sum[c];
              squares[c] += d * d;
              residue[c] += d;
              squares2[c] += e * e;
              residue2[c] += e;
            }
          }
          if (paired < g1) {
            const T* __restrict row = x + (n * v.l + paired) * v.c + c0;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) {
              const A d = load(row[c]) - sum[c];
              squares[c] += d * d;
              residue[c] += d;
            }
          }
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) {
            squares[c] += squares2[c];
            residue[c] += residue2[c];
          }
          // Moments::add for every channel at once (the counts are the channels' common ones): vectorised, where a
          // combination per channel and group would cost as much as the group's passes on narrow rows.
          const double seen = double(g0 - l0);
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) {
            const double res = residue[c];
            const double mean_b = double(sum[c]) + res * inv_k, m2_b = double(squares[c]) - res * res * inv_k;
            if (seen == 0) {
              acc_mean[c] = mean_b;
              acc_m2[c] = m2_b;
            } else {
              const double delta = mean_b - acc_mean[c];
              acc_mean[c] += delta * share;
              acc_m2[c] += m2_b + delta * delta * (seen * share);
            }
          }
        }
        for (int64_t c = 0; c < width; ++c) {
          partial[(n * tasks.segments + segment) * v.c + c0 + c] = Moments{double(l1 - l0), acc_mean[c], acc_m2[c]};
        }
      }
    };
    vectorised(v.c >= kWideChannels, tasks_body);
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


// ------------------------------------------------------------------------------------------------ apply
template <typename T>
void apply(const T* x, T* y, const View& v, const typename Compute<T>::type* centre,
           const typename Compute<T>::type* scale, const typename Compute<T>::type* shift) {
  affine_pass<T, false>(x, nullptr, y, v, centre, nullptr, scale, shift);
}


}  // namespace snzoo_cpu
