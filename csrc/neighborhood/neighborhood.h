// Window rule and relative-position-bias (rpb) index math of neighborhood
// attention (NA / dilated NA), shared by the CPU kernel and any CUDA kernel so
// that the CPU tests exercise the same formulas. Matches NATTEN exactly.
//
// Per axis of length L, kernel size k, dilation d, stride s, query index i:
//   left = k / 2, right = k / 2 + k % 2 - 1
//   not causal: leader = min((i / s) * s + s / 2, L - 1)
//               start  = max(leader - left, 0) + (leader + right >= L) * (L - right - leader - 1)
//               end    = start + k       (full size, shifted inward at the borders)
//   causal:     leader = min((i / s) * s + s - 1, L - 1)
//               start  = max(leader - left - right, 0), end = min(i + 1, L)
// With dilation, position i is in group g = i % d and the rule runs in group
// coordinates (i / d) over the group's length L / d + (g < L % d).
//
// rpb index (NAT/DiNAT; stride 1, not causal): (j - i) / d + k - 1 per axis
// for query i and key j of one group, in [0, 2k - 2].
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/common.h"
#include "../common/fast_math.h"

namespace fastvision::na {

FV_HOST_DEVICE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
FV_HOST_DEVICE int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// [start, end) of query i's window on an axis of length L, in the
// coordinates of i's dilation group (no dilation here).
struct Range {
  int64_t start, end;
};

FV_HOST_DEVICE Range window_range(int64_t i, int64_t L, int64_t k, int64_t s, bool causal) {
  const int64_t left = k / 2, right = k / 2 + k % 2 - 1;
  if (causal) {
    const int64_t leader = imin((i / s) * s + s - 1, L - 1);
    return {imax(leader - left - right, 0), imin(i + 1, L)};
  }
  const int64_t leader = imin((i / s) * s + s / 2, L - 1);
  const int64_t start = imax(leader - left, 0) + (leader + right >= L ? L - right - leader - 1 : 0);
  return {start, start + k};
}

// Length of dilation group g on an axis of length L.
FV_HOST_DEVICE int64_t group_length(int64_t L, int64_t d, int64_t g) {
  return L / d + (g < L % d ? 1 : 0);
}

// A run of positions on one axis, first + t * dilation for t < count, and the
// rpb index of its first element (the index moves by +1 per step along a
// query's keys and by -1 along a key's queries).
struct AxisRun {
  int64_t first, count, rpb_first;
};

// The keys of query i on one axis: first + m * d for m < count, rpb index
// rpb_first + m.
FV_HOST_DEVICE AxisRun axis_window(int64_t i, int64_t L, int64_t k, int64_t d, int64_t s,
                                   bool causal) {
  const int64_t g = i % d, ig = i / d;
  const Range r = window_range(ig, group_length(L, d, g), k, s, causal);
  return {r.start * d + g, r.end - r.start, r.start - ig + k - 1};
}

// The queries whose window holds key j on one axis (the inverse neighborhood):
// first + t * d for t < count, rpb index rpb_first - t. Window starts and ends
// are non-decreasing in the query index, so the set is one run, found by two
// binary searches: the first query whose window ends after j, and the first
// whose window starts after j.
FV_HOST_DEVICE AxisRun axis_inverse(int64_t j, int64_t L, int64_t k, int64_t d, int64_t s,
                                    bool causal) {
  const int64_t g = j % d, jg = j / d, Lg = group_length(L, d, g);
  int64_t lo = 0, hi = Lg;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (window_range(mid, Lg, k, s, causal).end > jg) hi = mid;
    else lo = mid + 1;
  }
  const int64_t first = lo;
  hi = Lg;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (window_range(mid, Lg, k, s, causal).start > jg) hi = mid;
    else lo = mid + 1;
  }
  return {first * d + g, imax(lo - first, 0), jg - first + k - 1};
}

// Flat index into rpb of shape (heads, R0, R1, R2), Ra = 2 ka - 1 (1 for
// padded axes).
FV_HOST_DEVICE int64_t rpb_index(int64_t h, int64_t r0, int64_t r1, int64_t r2, int64_t R0,
                                 int64_t R1, int64_t R2) {
  return ((h * R0 + r0) * R1 + r1) * R2 + r2;
}

}  // namespace fastvision::na
