// CPU kernels of multi-scale deformable attention (Deformable DETR's
// MSDeformAttnFunction; the anchor has CUDA kernels only).
//
// value (N, S, M, D): head m's D channels of a position are contiguous, so
// every sample's four corners are four rows of D values: the inner loops run
// over D (vectorised), the sample's bilinear corners and weights coming from
// csrc/common/bilinear.h (the rule of grid_sample(align_corners=False, zeros)
// after x W - 0.5, y H - 0.5).
//
// Forward: tasks of queries; every (query, head) output row is written by one
// task: out[n, q, m, :] = sum_{l, p} a * sum_k w_k value[corner k].
//
// Backward, deterministic without atomics: the value gradient of level l,
// head m, batch n is a scatter of the samples of (n, ., m, l, .) alone, so a
// task (n, m, l) owns that block of dvalue and walks its samples in query
// order; it also writes these samples' location and weight gradients, which
// no other task touches. The order never depends on the thread count.
//
// float and double kernels; half and bfloat16 are widened to float on entry
// (fp32 accumulation) and the outputs narrowed on exit.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "../common/alloc.h"
#include "../common/bilinear.h"
#include "../common/check.h"
#include "../common/common.h"
#include "../common/dtype.h"
#include "../common/parallel.h"
#include "checks.h"

namespace fastvision::msda {
namespace {

template <typename T>
struct Ptrs {
  const T *value, *loc, *attn, *dout;
  T *out, *dvalue, *dloc, *dattn;
};

// Output rows of queries [q0, q1) of batch n, all heads.
template <typename T>
FV_CPU_CLONES void forward_queries(const MsdaSizes& s, const Ptrs<T>& a, int64_t n, int64_t q0, int64_t q1) {
  const int64_t M = s.M, D = s.D, L = s.L, P = s.P, MD = M * D;
  for (int64_t q = q0; q < q1; ++q) {
    for (int64_t m = 0; m < M; ++m) {
      T* __restrict o = a.out + ((n * s.Lq + q) * M + m) * D;
      std::fill(o, o + D, T(0));
      const int64_t sample0 = ((n * s.Lq + q) * M + m) * L * P;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = s.H[l], W = s.W[l];
        const T* level = a.value + (n * s.S + s.start[l]) * MD + m * D;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = sample0 + l * P + p;
          const Bilinear<T> b = bilinear_at<T>(a.loc[2 * i + 1] * T(H) - T(0.5), a.loc[2 * i] * T(W) - T(0.5), H, W);
          for (int k = 0; k < 4; ++k) {
            if (!b.valid[k]) continue;
            const T w = b.weight(k) * a.attn[i];
            const T* __restrict v = level + b.index(k, W) * MD;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) o[d] += w * v[d];
          }
        }
      }
    }
  }
}

// Every sample of batch n, head m, level l, in query order: its location and
// weight gradients, and its share of the level's value gradient (owned here:
// zeroed here too, so that the pages are first touched by the thread using them).
template <typename T>
FV_CPU_CLONES void backward_level(const MsdaSizes& s, const Ptrs<T>& a, int64_t n, int64_t m, int64_t l) {
  const int64_t M = s.M, D = s.D, L = s.L, P = s.P, MD = M * D;
  const int64_t H = s.H[l], W = s.W[l];
  const int64_t level = (n * s.S + s.start[l]) * MD + m * D;
  const T* value = a.value + level;
  T* dvalue = a.dvalue + level;
  for (int64_t pix = 0; pix < H * W; ++pix) std::fill(dvalue + pix * MD, dvalue + pix * MD + D, T(0));
  for (int64_t q = 0; q < s.Lq; ++q) {
    const T* __restrict g = a.dout + ((n * s.Lq + q) * M + m) * D;
    const int64_t sample0 = (((n * s.Lq + q) * M + m) * L + l) * P;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t i = sample0 + p;
      const T att = a.attn[i];
      const Bilinear<T> b = bilinear_at<T>(a.loc[2 * i + 1] * T(H) - T(0.5), a.loc[2 * i] * T(W) - T(0.5), H, W);
      T gw = 0, gy = 0, gx = 0;
      for (int k = 0; k < 4; ++k) {
        if (!b.valid[k]) continue;
        const int64_t at = b.index(k, W) * MD;
        const T* __restrict v = value + at;
        T* __restrict dv = dvalue + at;
        const T w = b.weight(k), wa = w * att;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) {
          dot += g[d] * v[d];
          dv[d] += wa * g[d];
        }
        gw += w * dot;
        gy += b.dwy(k) * dot;
        gx += b.dwx(k) * dot;
      }
      a.dattn[i] = gw;
      // d pixel / d location: x W - 0.5 and y H - 0.5.
      a.dloc[2 * i] = att * gx * T(W);
      a.dloc[2 * i + 1] = att * gy * T(H);
    }
  }
}

constexpr int64_t kQueriesPerTask = 16;

template <typename T>
Tensor forward_impl(const char* op, const MsdaSizes& s, const Tensor& value, const Tensor& loc, const Tensor& attn) {
  Tensor out = alloc_empty(op, "out", value, {s.N, s.Lq, s.M * s.D}, acc_scalar_type<T>());
  Ptrs<T> a{value.const_data_ptr<T>(), loc.const_data_ptr<T>(), attn.const_data_ptr<T>(), nullptr,
            out.mutable_data_ptr<T>(), nullptr, nullptr, nullptr};
  const int64_t blocks = ceil_div(s.Lq, kQueriesPerTask);
  parallel_for(op, 0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, q0 = (task % blocks) * kQueriesPerTask;
      forward_queries(s, a, n, q0, std::min(s.Lq, q0 + kQueriesPerTask));
    }
  });
  return out;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> backward_impl(const char* op, const MsdaSizes& s, const Tensor& dout,
                                                 const Tensor& value, const Tensor& loc, const Tensor& attn) {
  const ScalarType t = acc_scalar_type<T>();
  Tensor dvalue = alloc_empty(op, "dvalue", value, sizes_of(value), t);  // each task zeroes its block
  Tensor dloc = alloc_empty(op, "dsampling_locations", loc, sizes_of(loc), t);
  Tensor dattn = alloc_empty(op, "dattention_weights", attn, sizes_of(attn), t);
  Ptrs<T> a{value.const_data_ptr<T>(), loc.const_data_ptr<T>(), attn.const_data_ptr<T>(), dout.const_data_ptr<T>(),
            nullptr, dvalue.mutable_data_ptr<T>(), dloc.mutable_data_ptr<T>(), dattn.mutable_data_ptr<T>()};
  parallel_for(op, 0, s.N * s.M * s.L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      backward_level(s, a, task / (s.M * s.L), task / s.L % s.M, task % s.L);
  });
  return {dvalue, dloc, dattn};
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp).

Tensor ms_deform_attn_fwd_cpu(Tensor value, Tensor value_spatial_shapes, Tensor value_level_start_index,
                              Tensor sampling_locations, Tensor attention_weights) {
  constexpr const char* op = "ms_deform_attn_fwd";
  const MsdaSizes s = check_msda_inputs(op, value, value_spatial_shapes, value_level_start_index, sampling_locations,
                                        attention_weights);
  const Tensor v = widen(op, "value", value, s.acc), l = widen(op, "sampling_locations", sampling_locations, s.acc),
               w = widen(op, "attention_weights", attention_weights, s.acc);
  Tensor out = s.acc == ScalarType::Double ? forward_impl<double>(op, s, v, l, w) : forward_impl<float>(op, s, v, l, w);
  return alloc_cast(op, "out", out, s.dtype);
}

std::tuple<Tensor, Tensor, Tensor> ms_deform_attn_bwd_cpu(Tensor dout, Tensor value, Tensor value_spatial_shapes,
                                                          Tensor value_level_start_index, Tensor sampling_locations,
                                                          Tensor attention_weights) {
  constexpr const char* op = "ms_deform_attn_bwd";
  const MsdaSizes s = check_msda_inputs(op, value, value_spatial_shapes, value_level_start_index, sampling_locations,
                                        attention_weights);
  check_msda_dout(op, s, dout, value);
  const Tensor v = widen(op, "value", value, s.acc), l = widen(op, "sampling_locations", sampling_locations, s.acc),
               w = widen(op, "attention_weights", attention_weights, s.acc), g = widen(op, "dout", dout, s.acc);
  auto [dv, dl, dw] = s.acc == ScalarType::Double ? backward_impl<double>(op, s, g, v, l, w)
                                                  : backward_impl<float>(op, s, g, v, l, w);
  return {alloc_cast(op, "dvalue", dv, s.dtype), alloc_cast(op, "dsampling_locations", dl, s.dtype),
          alloc_cast(op, "dattention_weights", dw, s.dtype)};
}

}  // namespace
}  // namespace fastvision::msda

STABLE_TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("ms_deform_attn_fwd", TORCH_BOX(&fastvision::msda::ms_deform_attn_fwd_cpu));
  m.impl("ms_deform_attn_bwd", TORCH_BOX(&fastvision::msda::ms_deform_attn_bwd_cpu));
}
