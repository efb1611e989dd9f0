// The full-size passes of switchable normalisation on the CPU, shared by the operators of switch_norm_cpu.cpp.
//
// x is viewed without a copy as (N, C, L) rows (contiguous input) or as (N, L, C) (channels innermost: channels_last
// and channels_last_3d), L >= 2, in float32, float64, bfloat16 or float16. Half-precision values are read and written
// in their own dtype and computed in float32 (the "compute dtype"); nothing full-size is copied. Every pass splits its
// work from the shapes alone, never from the thread count, so that results do not depend on how many threads run.
//
// - affine_pass / apply: out = (x - m) * b + c (+ g * a), per (n, c) (here).
// - moments (sn_moments.h; a row's parts in sn_row_moments.h): per-(n, c) IN mean and unbiased variance (float64) in
//   one read from memory; centre = the mean rounded to the compute dtype.
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
// values each, so that there are tasks for every thread at batch 1 too; inside a task, rows go in groups of about
// kChunk values, summed in the compute dtype (vectorised over the channels) and then accumulated in float64.
constexpr int64_t kChannelBlock = 64;
constexpr int64_t kFlatValues = 128;  // narrow channels-innermost rows are handled this many values at a time
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
    // sample, then segment, then block: consecutive tasks cover consecutive rows, as the output pass splits them, so
    // that a thread's second read of a part of x finds it in its own core's cache
    c0 = (task % blocks) * block;
    const int64_t rest = task / blocks;
    segment = rest % segments;
    n = rest / segments;
    width = std::min(block, v.c - c0);
    l0 = segment * segment_rows;
    l1 = std::min(v.l, l0 + segment_rows);
  }
};

// The output epilogue of the forward: with kResidual, a residual r is added to the value rounded to T (and the sum
// rounded again: what `y + r` on the layer's output computes); with kRelu, negative values become 0 (NaN stays NaN,
// as torch's relu); then the rounding to T. The values are those of the separate operations, bit for bit.
template <typename T, bool kRelu, bool kResidual>
inline typename Compute<T>::type epilogue(typename Compute<T>::type value, const T* __restrict r, int64_t i) {
  using A = typename Compute<T>::type;
  if (kResidual) value = load(store<T>(value)) + load(r[i]);
  if (kRelu) value = value < A(0) ? A(0) : value;
  return value;
}

// out = (x - m) * b + c, plus g * a when kWithGrad, with per-(n, c) coefficients, in x's layout, through `epilogue`.
// The coefficients of a row are hoisted into registers (NCL) and every pointer is restrict, so that the inner loops
// vectorise.
template <typename T, bool kWithGrad, bool kRelu = false, bool kResidual = false>
void affine_pass(const T* __restrict x, const T* __restrict g, T* __restrict out, const View& v,
                 const typename Compute<T>::type* __restrict m, const typename Compute<T>::type* __restrict a,
                 const typename Compute<T>::type* __restrict b, const typename Compute<T>::type* __restrict c,
                 const T* __restrict r = nullptr) {
  using A = typename Compute<T>::type;
  if (!v.nlc) {
    at::parallel_for(0, v.n * v.c, std::max<int64_t>(1, kTaskValues / v.l), [&](int64_t begin, int64_t end) {
      auto rows = [&]() SNZOO_INLINE_BODY {
        for (int64_t row = begin; row < end; ++row) {
          const A mr = m[row], ar = kWithGrad ? a[row] : A(0), br = b[row], cr = c[row];
          const T* __restrict xr = x + row * v.l;
          const T* __restrict gr = kWithGrad ? g + row * v.l : nullptr;
          const T* __restrict rr = kResidual ? r + row * v.l : nullptr;
          T* __restrict yr = out + row * v.l;
#pragma omp simd
          for (int64_t l = 0; l < v.l; ++l) {
            A value = (load(xr[l]) - mr) * br + cr;
            if (kWithGrad) value += load(gr[l]) * ar;
            yr[l] = store<T>(epilogue<T, kRelu, kResidual>(value, rr, l));
          }
        }
      };
      vectorised(v.l >= kWideRow, rows);
    });
    return;
  }
  // Narrow rows (few channels) go `per` at a time as one flat run of per * C values, with the sample's coefficients
  // repeated `per` times: one long vector loop where a loop per row of 16 channels would be mostly loop overhead.
  // Values are computed by the same formula either way, so the results do not depend on the grouping.
  const int64_t per = v.c <= kFlatValues / 4 ? kFlatValues / v.c : 1, width = per * v.c;
  at::parallel_for(0, v.n * v.l, std::max<int64_t>(1, kTaskValues / v.c), [&](int64_t begin, int64_t end) {
    // The rows of one sample share its coefficients: found once per sample, not per row (a row can be one vector).
    auto rows = [&]() SNZOO_INLINE_BODY {
      A rm[kFlatValues], ra[kFlatValues], rb[kFlatValues], rc[kFlatValues];
      for (int64_t row = begin; row < end;) {
        const int64_t first = (row / v.l) * v.c, stop = std::min(end, (row / v.l + 1) * v.l);
        const A* __restrict mn = m + first;
        const A* __restrict an = kWithGrad ? a + first : nullptr;
        const A* __restrict bn = b + first;
        const A* __restrict cn = c + first;
        if (per > 1 && stop - row >= per) {
          for (int64_t i0 = 0; i0 < width; i0 += v.c) {
            for (int64_t ch = 0; ch < v.c; ++ch) {
              rm[i0 + ch] = mn[ch];
              rb[i0 + ch] = bn[ch];
              rc[i0 + ch] = cn[ch];
              if (kWithGrad) ra[i0 + ch] = an[ch];
            }
          }
          for (; row + per <= stop; row += per) {
            const T* __restrict xr = x + row * v.c;
            const T* __restrict gr = kWithGrad ? g + row * v.c : nullptr;
            const T* __restrict rr = kResidual ? r + row * v.c : nullptr;
            T* __restrict yr = out + row * v.c;
#pragma omp simd
            for (int64_t i = 0; i < width; ++i) {
              A value = (load(xr[i]) - rm[i]) * rb[i] + rc[i];
              if (kWithGrad) value += load(gr[i]) * ra[i];
              yr[i] = store<T>(epilogue<T, kRelu, kResidual>(value, rr, i));
            }
          }
        }
        for (; row < stop; ++row) {
          const T* __restrict xr = x + row * v.c;
          const T* __restrict gr = kWithGrad ? g + row * v.c : nullptr;
          const T* __restrict rr = kResidual ? r + row * v.c : nullptr;
          T* __restrict yr = out + row * v.c;
#pragma omp simd
          for (int64_t ch = 0; ch < v.c; ++ch) {
            A value = (load(xr[ch]) - mn[ch]) * bn[ch] + cn[ch];
            if (kWithGrad) value += load(gr[ch]) * an[ch];
            yr[ch] = store<T>(epilogue<T, kRelu, kResidual>(value, rr, ch));
          }
        }
      }
    };
    vectorised(v.c >= kWideChannels, rows);
  });
}

// y = (x - centre) * scale + shift per (n, c); then + residual (where not null; in x's layout and dtype) and
// max(., 0) with relu, as `epilogue`.
template <typename T>
void apply(const T* x, T* y, const View& v, const typename Compute<T>::type* centre,
           const typename Compute<T>::type* scale, const typename Compute<T>::type* shift, bool relu = false,
           const T* residual = nullptr) {
  if (residual != nullptr) {
    if (relu) {
      affine_pass<T, false, true, true>(x, nullptr, y, v, centre, nullptr, scale, shift, residual);
    } else {
      affine_pass<T, false, false, true>(x, nullptr, y, v, centre, nullptr, scale, shift, residual);
    }
  } else if (relu) {
    affine_pass<T, false, true>(x, nullptr, y, v, centre, nullptr, scale, shift);
  } else {
    affine_pass<T, false>(x, nullptr, y, v, centre, nullptr, scale, shift);
  }
}


}  // namespace snzoo_cpu
