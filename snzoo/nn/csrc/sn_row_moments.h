// Per-(n, c) moments of rows held contiguously ((N, C, L) input), for sn_moments.h: a row goes in parts of about
// kChunk values, each read from memory once, and the parts combine exactly in float64. A part is summed in one pass
// around its first value where that value lies close enough to the part's mean, else in two (its mean m, then
// d = x - m, whose sums correct m and give the squared deviations without cancellation), so that a large mean costs
// no precision either way.

#pragma once

#include "sn_passes.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

namespace snzoo_cpu {

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

// One read instead of two where a row allows it: the sums of d = x - p and of d^2 around the row's first value p give
// its moments in one pass, m2 = sum d^2 - (sum d)^2 / k, which loses precision only in proportion to
// k (mean - p)^2 / m2. Where that exceeds kPilotLimit (p far out in the row's distribution, a constant row, NaN or
// infinity), the row takes the two passes. The choice depends on the row's values alone.
constexpr double kPilotLimit = 4.0;

inline bool from_pilot(double pilot, double count, double inv_count, double sum_d, double squares, Moments& out) {
  const double shift = sum_d * sum_d * inv_count, m2 = squares - shift;
  if (!(m2 > 0 && shift <= kPilotLimit * m2)) return false;
  out = {count, pilot + sum_d * inv_count, m2};
  return true;
}

// The moments of four short rows at once: four independent chains of vector adds keep the core busy where one short
// row's chain waits on the latency of each add (rows of 49 values: 28x28 maps after two stride-2 stages). Every row's
// sums come from the same instructions whatever the other three rows are, so a row's result does not depend on its
// neighbours; a group of fewer rows repeats its last one.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SNZOO_AVX512_ROWS 1
// The sums of d = x - p and d^2 of one short float32 or bfloat16 row in 16-value vectors, its last values through a
// masked load (a compiler's own loop leaves them to scalar code, as long as the row's vector part at 49 values).
inline __m512 load16_masked(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16_masked(const c10::BFloat16* p, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <typename T>
inline void row_sums16(const T* __restrict x, int64_t count, float pilot, float& sum_d, float& squares) {
  const __m512 p = _mm512_set1_ps(pilot);
  __m512 s = _mm512_setzero_ps(), q = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 d = _mm512_sub_ps(load16_masked(x + i, 0xFFFF), p);
    s = _mm512_add_ps(s, d);
    q = _mm512_fmadd_ps(d, d, q);
  }
  if (i < count) {
    const __mmask16 mask = __mmask16((1u << (count - i)) - 1);
    const __m512 d = _mm512_maskz_sub_ps(mask, load16_masked(x + i, mask), p);
    s = _mm512_add_ps(s, d);
    q = _mm512_fmadd_ps(d, d, q);
  }
  sum_d = _mm512_reduce_add_ps(s);
  squares = _mm512_reduce_add_ps(q);
}
#endif

template <typename T>
void short_moments4(const T* __restrict r0, const T* __restrict r1, const T* __restrict r2, const T* __restrict r3,
                    int64_t count, double inv_count, Moments* out) {
  using A = typename Compute<T>::type;
  const A p0 = load(r0[0]), p1 = load(r1[0]), p2 = load(r2[0]), p3 = load(r3[0]);
  A s0 = 0, s1 = 0, s2 = 0, s3 = 0, q0 = 0, q1 = 0, q2 = 0, q3 = 0;
#ifdef SNZOO_AVX512_ROWS
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    row_sums16(r0, count, p0, s0, q0);
    row_sums16(r1, count, p1, s1, q1);
    row_sums16(r2, count, p2, s2, q2);
    row_sums16(r3, count, p3, s3, q3);
  } else
#endif
#pragma omp simd reduction(+ : s0, s1, s2, s3, q0, q1, q2, q3)
  for (int64_t i = 0; i < count; ++i) {
    const A d0 = load(r0[i]) - p0, d1 = load(r1[i]) - p1, d2 = load(r2[i]) - p2, d3 = load(r3[i]) - p3;
    s0 += d0;
    s1 += d1;
    s2 += d2;
    s3 += d3;
    q0 += d0 * d0;
    q1 += d1 * d1;
    q2 += d2 * d2;
    q3 += d3 * d3;
  }
  const T* rows[4] = {r0, r1, r2, r3};
  const A p[4] = {p0, p1, p2, p3}, sd[4] = {s0, s1, s2, s3}, q[4] = {q0, q1, q2, q3};
  for (int k = 0; k < 4; ++k) {
    if (!from_pilot(double(p[k]), double(count), inv_count, double(sd[k]), double(q[k]), out[k])) {
      out[k] = short_moments(rows[k], count, inv_count);
    }
  }
}

template <typename T>
Moments chunk_moments(const T* __restrict x, int64_t count, double inv_count) {
  using A = typename Compute<T>::type;
  if (count < 4 * kLanes) return short_moments(x, count, inv_count);  // too short for the lanes to pay off
  const int64_t whole = count / kLanes * kLanes;
  const A pilot = load(x[0]);
  A sum_d, squares_d;
  wide_vectors([&]() SNZOO_INLINE_BODY {
    A sum_lanes[kLanes] = {}, square_lanes[kLanes] = {};
    for (int64_t i = 0; i < whole; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const A d = load(x[i + j]) - pilot;
        sum_lanes[j] += d;
        square_lanes[j] += d * d;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < count - whole; ++j) {
      const A d = load(x[whole + j]) - pilot;
      sum_lanes[j] += d;
      square_lanes[j] += d * d;
    }
    sum_d = fold_lanes(sum_lanes);
    squares_d = fold_lanes(square_lanes);
  });
  Moments one_pass;
  if (from_pilot(double(pilot), double(count), inv_count, double(sum_d), double(squares_d), one_pass)) return one_pass;
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


}  // namespace snzoo_cpu
