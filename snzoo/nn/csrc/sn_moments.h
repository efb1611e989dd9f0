// Per-(n, c) IN mean and unbiased variance (float64) of x in either view (sn_passes.h), in one read from memory:
// rows ((N, C, L)) through sn_row_moments.h; channels-innermost input ((N, L, C)) in tasks of a sample, a block of
// channels and a segment of rows, each group of rows summed in the compute dtype (two passes while it is in cache)
// and the groups, segments and samples combined exactly in float64.

#pragma once

#include "sn_row_moments.h"

namespace snzoo_cpu {

// The sums of one group of `rows` channels-innermost rows (row stride `stride`, `width` channels from the first):
// per channel the centre m = (sum x) * inv_count, then sum (x - m)^2 and sum (x - m), as chunk_moments' two passes.
//
// paired_group_sums: rows go in pairs, each row of a pair into its own sums (added at the end), so that two chains
// of vector adds are in flight: with few channels a row is one vector, and one chain waits on every add's latency.
template <typename T>
SNZOO_INLINE_BODY inline void paired_group_sums(const T* __restrict x, int64_t rows, int64_t stride, int64_t width,
                                                typename Compute<T>::type inv_count,
                                                typename Compute<T>::type* __restrict sum,
                                                typename Compute<T>::type* __restrict squares,
                                                typename Compute<T>::type* __restrict residue) {
  using A = typename Compute<T>::type;
  A sum2[kChannelBlock], squares2[kChannelBlock], residue2[kChannelBlock];
  const T zeros[kChannelBlock] = {};  // the partner of an odd group's last row
  for (int64_t c = 0; c < width; ++c) sum[c] = squares[c] = residue[c] = sum2[c] = squares2[c] = residue2[c] = 0;
  const int64_t paired = rows / 2 * 2;
  for (int64_t l = 0; l < rows; l += 2) {
    const T* __restrict row = x + l * stride;
    const T* __restrict next = l + 1 < rows ? row + stride : zeros;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      sum[c] += load(row[c]);
      sum2[c] += load(next[c]);
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) sum[c] = (sum[c] + sum2[c]) * inv_count;  // the second pass's centre
  for (int64_t l = 0; l < paired; l += 2) {
    const T* __restrict row = x + l * stride;
    const T* __restrict next = row + stride;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      const A d = load(row[c]) - sum[c], e = load(next[c]) - sum[c];
      squares[c] += d * d;
      residue[c] += d;
      squares2[c] += e * e;
      residue2[c] += e;
    }
  }
  if (paired < rows) {
    const T* __restrict row = x + paired * stride;
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
}

// Lanes that hold `per` copies of c channels, one after another: each channel's copies added up in order.
template <typename A>
inline void fold_copies(const A* __restrict lanes, int64_t per, int64_t c, A* __restrict out) {
  for (int64_t ch = 0; ch < c; ++ch) {
    A total = lanes[ch];
    for (int64_t k = 1; k < per; ++k) total += lanes[k * c + ch];
    out[ch] = total;
  }
}

// `per` copies of c values, one after another.
template <typename A>
inline void repeat_copies(const A* __restrict values, int64_t per, int64_t c, A* __restrict out) {
  for (int64_t k = 0; k < per; ++k) {
    for (int64_t ch = 0; ch < c; ++ch) out[k * c + ch] = values[ch];
  }
}

// flat_group_sums: narrow rows holding every channel (C <= kFlatValues / 4) are contiguous, so the group is one flat
// run read `per` rows (per * C values) at a time into per * C lanes, each channel's lanes added up in a fixed order
// at the end: long vector loops and `per` independent chains, where a loop per row of 16 channels is mostly overhead.
// The rows left over (fewer than `per`) go into the first lanes.
template <typename T>
SNZOO_INLINE_BODY inline void flat_group_sums(const T* __restrict x, int64_t rows, int64_t c,
                                              typename Compute<T>::type inv_count,
                                              typename Compute<T>::type* __restrict sum,
                                              typename Compute<T>::type* __restrict squares,
                                              typename Compute<T>::type* __restrict residue) {
  using A = typename Compute<T>::type;
  const int64_t per = kFlatValues / c, width = per * c;
  const int64_t whole = rows / per * width, total = rows * c;
  A lanes[kFlatValues] = {}, centre[kFlatValues];
  for (int64_t i = 0; i < whole; i += width) {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) lanes[j] += load(x[i + j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < total - whole; ++j) lanes[j] += load(x[whole + j]);
  fold_copies(lanes, per, c, sum);
  for (int64_t ch = 0; ch < c; ++ch) sum[ch] *= inv_count;
  repeat_copies(sum, per, c, centre);
  A square_lanes[kFlatValues] = {}, residue_lanes[kFlatValues] = {};
  for (int64_t i = 0; i < whole; i += width) {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const A d = load(x[i + j]) - centre[j];
      square_lanes[j] += d * d;
      residue_lanes[j] += d;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < total - whole; ++j) {
    const A d = load(x[whole + j]) - centre[j];
    square_lanes[j] += d * d;
    residue_lanes[j] += d;
  }
  fold_copies(square_lanes, per, c, squares);
  fold_copies(residue_lanes, per, c, residue);
}

// unit_group_sums: the same for float and bfloat16 input whose channel block is 64 values wide (C a multiple of 64,
// or C = 16 / 32 / 64 read as flat runs of 64 values, 64 / C rows each). The sums live in vector registers (GCC /
// Clang vector types: 4 vectors of 16 floats, twice over for two rows at a time), where arrays indexed by a runtime
// width stay in memory and every add waits on a store.
#if defined(__GNUC__)
#define SNZOO_UNITS 1
typedef float Floats16 __attribute__((vector_size(64)));
typedef uint16_t Halves16 __attribute__((vector_size(32)));
typedef uint32_t Words16 __attribute__((vector_size(64)));
constexpr int64_t kUnit = 64;

inline Floats16 load16(const float* p) {
  Floats16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline Floats16 load16(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  Halves16 h;
  std::memcpy(&h, p, sizeof h);
  const Words16 w = __builtin_convertvector(h, Words16) << 16;
  Floats16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
inline void store16(float* p, Floats16 v) { std::memcpy(p, &v, sizeof v); }

template <typename T>
constexpr bool kUnitType = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

inline bool unit_layout(int64_t c) { return c == 16 || c == 32 || c % kUnit == 0; }

// Per lane, over `units` units of 64 values (the first at x, then every `stride` values): the sum of x into sum[64].
template <typename T>
SNZOO_INLINE_BODY inline void unit_sum(const T* __restrict x, int64_t units, int64_t stride, float* __restrict sum) {
  Floats16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
  int64_t u = 0;
  for (; u + 2 <= units; u += 2) {
    const T* p = x + u * stride;
    const T* q = p + stride;
    a0 += load16(p), a1 += load16(p + 16), a2 += load16(p + 32), a3 += load16(p + 48);
    b0 += load16(q), b1 += load16(q + 16), b2 += load16(q + 32), b3 += load16(q + 48);
  }
  if (u < units) {
    const T* p = x + u * stride;
    a0 += load16(p), a1 += load16(p + 16), a2 += load16(p + 32), a3 += load16(p + 48);
  }
  store16(sum, a0 + b0), store16(sum + 16, a1 + b1), store16(sum + 32, a2 + b2), store16(sum + 48, a3 + b3);
}

// Per lane, sum (x - centre)^2 into squares[64] and sum (x - centre) into residue[64].
template <typename T>
SNZOO_INLINE_BODY inline void unit_deviations(const T* __restrict x, int64_t units, int64_t stride,
                                              const float* __restrict centre, float* __restrict squares,
                                              float* __restrict residue) {
  const Floats16 c0 = load16(centre), c1 = load16(centre + 16), c2 = load16(centre + 32), c3 = load16(centre + 48);
  Floats16 q0 = {}, q1 = {}, q2 = {}, q3 = {}, e0 = {}, e1 = {}, e2 = {}, e3 = {};
  Floats16 r0 = {}, r1 = {}, r2 = {}, r3 = {}, f0 = {}, f1 = {}, f2 = {}, f3 = {};
  int64_t u = 0;
  for (; u + 2 <= units; u += 2) {
    const T* p = x + u * stride;
    const T* q = p + stride;
    const Floats16 d0 = load16(p) - c0, d1 = load16(p + 16) - c1, d2 = load16(p + 32) - c2, d3 = load16(p + 48) - c3;
    const Floats16 g0 = load16(q) - c0, g1 = load16(q + 16) - c1, g2 = load16(q + 32) - c2, g3 = load16(q + 48) - c3;
    q0 += d0 * d0, q1 += d1 * d1, q2 += d2 * d2, q3 += d3 * d3;
    e0 += d0, e1 += d1, e2 += d2, e3 += d3;
    r0 += g0 * g0, r1 += g1 * g1, r2 += g2 * g2, r3 += g3 * g3;
    f0 += g0, f1 += g1, f2 += g2, f3 += g3;
  }
  if (u < units) {
    const T* p = x + u * stride;
    const Floats16 d0 = load16(p) - c0, d1 = load16(p + 16) - c1, d2 = load16(p + 32) - c2, d3 = load16(p + 48) - c3;
    q0 += d0 * d0, q1 += d1 * d1, q2 += d2 * d2, q3 += d3 * d3;
    e0 += d0, e1 += d1, e2 += d2, e3 += d3;
  }
  store16(squares, q0 + r0), store16(squares + 16, q1 + r1), store16(squares + 32, q2 + r2);
  store16(squares + 48, q3 + r3);
  store16(residue, e0 + f0), store16(residue + 16, e1 + f1), store16(residue + 32, e2 + f2);
  store16(residue + 48, e3 + f3);
}

// The group sums of paired_group_sums in units: `rows` rows of C channels-innermost values from x (the block's
// first channel), `width` = min(C, 64) channels.
template <typename T>
SNZOO_INLINE_BODY inline void unit_group_sums(const T* __restrict x, int64_t rows, int64_t c, float inv_count,
                                              float* __restrict sum, float* __restrict squares,
                                              float* __restrict residue) {
  float lanes[kUnit], centre[kUnit], square_lanes[kUnit], residue_lanes[kUnit];
  if (c >= kUnit) {  // a unit is one row's block
    unit_sum(x, rows, c, lanes);
    for (int64_t j = 0; j < kUnit; ++j) sum[j] = lanes[j] * inv_count;
    unit_deviations(x, rows, c, sum, squares, residue);
    return;
  }
  // flat: 64 / c rows per unit; the rows after the last whole unit go into the first lanes
  const int64_t per = kUnit / c, units = rows / per, tail = (rows - units * per) * c;
  const T* rest = x + units * kUnit;
  unit_sum(x, units, kUnit, lanes);
  for (int64_t j = 0; j < tail; ++j) lanes[j] += load(rest[j]);
  fold_copies(lanes, per, c, sum);
  for (int64_t ch = 0; ch < c; ++ch) sum[ch] *= inv_count;
  repeat_copies(sum, per, c, centre);
  unit_deviations(x, units, kUnit, centre, square_lanes, residue_lanes);
  for (int64_t j = 0; j < tail; ++j) {
    const float d = load(rest[j]) - centre[j];
    square_lanes[j] += d * d;
    residue_lanes[j] += d;
  }
  fold_copies(square_lanes, per, c, squares);
  fold_copies(residue_lanes, per, c, residue);
}
#endif

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
      if (v.l < 4 * kLanes) {  // one short part per row: four rows at a time
        for (int64_t r = begin; r < end; r += 4) {
          const T* row[4];
          for (int64_t k = 0; k < 4; ++k) row[k] = x + std::min(r + k, end - 1) * v.l;
          Moments mo[4];
          short_moments4(row[0], row[1], row[2], row[3], v.l, inv_full, mo);
          for (int64_t k = 0; k < 4 && r + k < end; ++k) finish(r + k, mo[k]);
        }
        return;
      }
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
  const bool flat = v.c <= kFlatValues / 4;  // one block of all channels, rows contiguous: flat_group_sums
#ifdef SNZOO_UNITS
  const bool units = unit_layout(v.c);
#endif
  std::vector<Moments> partial(v.n * tasks.segments * v.c);
  at::parallel_for(0, tasks.count(v), 1, [&](int64_t begin, int64_t end) {
    auto tasks_body = [&]() SNZOO_INLINE_BODY {
      A sum[kChannelBlock], squares[kChannelBlock], residue[kChannelBlock];
      double acc_mean[kChannelBlock], acc_m2[kChannelBlock];  // the task's moments so far, per channel
      for (int64_t task = begin; task < end; ++task) {
        int64_t n, c0, width, segment, l0, l1;
        tasks.unpack(v, task, n, c0, width, segment, l0, l1);
        for (int64_t g0 = l0; g0 < l1; g0 += tasks.group_rows) {
          const int64_t g1 = std::min(l1, g0 + tasks.group_rows);
          const double k = double(g1 - g0), inv_k = 1.0 / k;
          const double share = k / (double(g0 - l0) + k);  // every channel of the task has seen g0 - l0 rows
          const A inv_count = A(inv_k);
#ifdef SNZOO_UNITS
          if constexpr (kUnitType<T>) {
            if (units) {
              unit_group_sums(x + (n * v.l + g0) * v.c + c0, g1 - g0, v.c, inv_count, sum, squares, residue);
              goto combine;
            }
          }
#endif
          if (flat) {
            flat_group_sums(x + (n * v.l + g0) * v.c, g1 - g0, v.c, inv_count, sum, squares, residue);
          } else {
            paired_group_sums(x + (n * v.l + g0) * v.c + c0, g1 - g0, v.c, width, inv_count, sum, squares, residue);
          }
        combine:
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



}  // namespace snzoo_cpu
