// The backward's full-size reduction of switchable normalisation on the CPU (see sn_passes.h for the views, dtypes
// and task splits it shares with the forward's passes): sum_L g and sum_L g * (x - m) per (n, c), float64, in one
// read of g and x.

#pragma once

#include "sn_row_moments.h"

namespace snzoo_cpu {

// ------------------------------------------------------------------------------------------------ backward
// sum g and sum g * (x - m) over a part of a row, in lanes as chunk_moments when the part is long enough.
template <typename T>
void part_grad_sums(const T* __restrict g, const T* __restrict x, int64_t count, typename Compute<T>::type m,
                    typename Compute<T>::type& sum_g, typename Compute<T>::type& sum_gd) {
  using A = typename Compute<T>::type;
  A part_g = 0, part_gd = 0;
  if (count < 4 * kLanes) {
#pragma omp simd reduction(+ : part_g, part_gd)
    for (int64_t l = 0; l < count; ++l) {
      const A gl = load(g[l]);
      part_g += gl;
      part_gd += gl * (load(x[l]) - m);
    }
    sum_g = part_g, sum_gd = part_gd;
    return;
  }
  const int64_t whole = count / kLanes * kLanes;
  wide_vectors([&]() SNZOO_INLINE_BODY {
    A lanes_g[kLanes] = {}, lanes_gd[kLanes] = {};
    for (int64_t i = 0; i < whole; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const A gl = load(g[i + j]);
        lanes_g[j] += gl;
        lanes_gd[j] += gl * (load(x[i + j]) - m);
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < count - whole; ++j) {  // the rest into the first lanes, as chunk_moments does
      const A gl = load(g[whole + j]);
      lanes_g[j] += gl;
      lanes_gd[j] += gl * (load(x[whole + j]) - m);
    }
    part_g = fold_lanes(lanes_g);
    part_gd = fold_lanes(lanes_gd);
  });
  sum_g = part_g, sum_gd = part_gd;
}

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
          A part_g, part_gd;
          part_grad_sums(gr, xr, count, mr, part_g, part_gd);
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
    auto tasks_body = [&]() SNZOO_INLINE_BODY {
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
    };
    vectorised(v.c >= kWideChannels, tasks_body);
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


}  // namespace snzoo_cpu
