// CPU kernels of DCNv3 / DCNv4 aggregation (InternImage's DCNv3 op; DCNv4's
// kernels share its semantics), channels-last: input (N, H, W, G * Cg),
// offset (N, Ho, Wo, G * K * 2) as (dx, dy) pixel pairs, mask (N, Ho, Wo, G * K).
// For output (n, ho, wo), group g and kernel point p = (i, j) (x outer, y
// inner; remove_center skips (kw / 2, kh / 2)):
//   x = wo * stride_w - pad_w + half_w - half_w * s + (i * dil_w + dx) * s
//   y likewise, half = (dil * (k - 1)) / 2, s = offset_scale;
//   out[n, ho, wo, g, :] = sum_p m_p * bilinear(input[n, :, :, g, :], y, x),
// m = softmax over the K points of the group with mask_softmax, else the mask.
//
// Forward: tasks of output rows (n, ho); the channel loops are contiguous
// (channels-last) and vectorise.
// Backward: one task per (n, g), visiting that group's outputs in a fixed
// order: it owns dinput[n, :, :, g, :] (the scatter of the anchors, done
// without atomics, so the result is deterministic for every thread count)
// and writes doffset / dmask of its outputs.
//
// float and double kernels; half and bfloat16 are widened to float on entry
// (fp32 accumulation) and the outputs narrowed on exit.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../common/alloc.h"
#include "../common/bilinear.h"
#include "../common/check.h"
#include "../common/common.h"
#include "../common/dtype.h"
#include "../common/parallel.h"
#include "checks.h"

namespace fastvision::dcn {
namespace {

// The kernel point p's (i, j) and the sampling point's (x, y) of output (ho, wo).
struct Grid {
  int64_t kh, kw, center, dh, dw;
  bool remove_center;
  template <typename T>
  void point(int64_t p, T bx, T by, T s, const T* off, T* x, T* y) const {
    const int64_t t = p + (remove_center && p >= center ? 1 : 0);
    const int64_t i = t / kh, j = t % kh;
    *x = bx + (T(i * dw) + off[2 * p]) * s;
    *y = by + (T(j * dh) + off[2 * p + 1]) * s;
  }
};

Grid grid_of(const DcnSizes& n) {
  return {n.kh, n.kw, (n.kw / 2) * n.kh + n.kh / 2, n.dh, n.dw, n.remove_center};
}

// The top-left of the dilated grid at output index o: o * stride - pad + half - half * s.
template <typename T>
T grid_base(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t k, T s) {
  const int64_t half = (dil * (k - 1)) / 2;
  return T(o * stride - pad + half) - T(half) * s;
}

// The group's K weights: the mask, or its softmax.
template <typename T>
void load_weights(const T* mask, int64_t K, bool softmax, T* m) {
  if (!softmax) {
    std::copy(mask, mask + K, m);
    return;
  }
  T mx = mask[0];
  for (int64_t p = 1; p < K; ++p) mx = std::max(mx, mask[p]);
  T sum = 0;
  for (int64_t p = 0; p < K; ++p) sum += (m[p] = std::exp(mask[p] - mx));
  for (int64_t p = 0; p < K; ++p) m[p] /= sum;
}

// The channel loops over the four corners of a sample at once, inlined into
// the cloned row / task functions below (a cloned function is called through
// an indirection that would cost more than Cg = 16 multiply-adds). A corner
// outside the image reads a zero row and writes a scratch row, with weight 0.
template <typename T>
inline void gather4(T* __restrict o, const T* const v[4], const T w[4], int64_t n) {
  const T *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) o[c] += w[0] * v0[c] + w[1] * v1[c] + w[2] * v2[c] + w[3] * v3[c];
}

// d[k] = go . v[k] for the four corners, and dv[k] += a[k] * go.
template <typename T>
inline void scatter4(const T* __restrict go, const T* const v[4], T* const dv[4], const T a[4], T d[4], int64_t n) {
  const T *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
  T *dv0 = dv[0], *dv1 = dv[1], *dv2 = dv[2], *dv3 = dv[3];
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
  for (int64_t c = 0; c < n; ++c) {
    const T gc = go[c];
    d0 += gc * v0[c];
    d1 += gc * v1[c];
    d2 += gc * v2[c];
    d3 += gc * v3[c];
    dv0[c] += a[0] * gc;
    dv1[c] += a[1] * gc;
    dv2[c] += a[2] * gc;
    dv3[c] += a[3] * gc;
  }
  d[0] = d0, d[1] = d1, d[2] = d2, d[3] = d3;
}

// Rows of a parallel loop per task such that a task does at least ~2^15
// multiply-adds: small problems run inline (a thread-pool hand-off costs more).
int64_t grain(int64_t work_per_row) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work_per_row)); }

// One output row (n, ho): every wo, group and kernel point.
template <typename T>
FV_CPU_CLONES void forward_row(const DcnSizes& n, const Grid& grid, int64_t row, const T* in, const T* off,
                               const T* msk, T* out, T* m, const T* zeros) {
  const T s = T(n.scale);
  const int64_t G = n.G, K = n.K, Cg = n.Cg, C = n.C;
  const int64_t b = row / n.Ho, ho = row % n.Ho;
  const T by = grid_base(ho, n.sh, n.ph, n.dh, n.kh, s);
  const T* image = in + b * n.H * n.W * C;
  for (int64_t wo = 0; wo < n.Wo; ++wo) {
    const int64_t q = row * n.Wo + wo;
    const T bx = grid_base(wo, n.sw, n.pw, n.dw, n.kw, s);
    for (int64_t g = 0; g < G; ++g) {
      T* o = out + q * C + g * Cg;
      std::fill(o, o + Cg, T(0));
      load_weights(msk + (q * G + g) * K, K, n.softmax, m);
      const T* offs = off + (q * G + g) * K * 2;
      for (int64_t p = 0; p < K; ++p) {
        T x, y;
        grid.point(p, bx, by, s, offs, &x, &y);
        const Bilinear<T> bl = bilinear_at(y, x, n.H, n.W);
        if (!(bl.valid[0] || bl.valid[1] || bl.valid[2] || bl.valid[3])) continue;
        const T* v[4];
        T w[4];
        for (int k = 0; k < 4; ++k) {
          v[k] = bl.valid[k] ? image + bl.index(k, n.W) * C + g * Cg : zeros;
          w[k] = m[p] * bl.weight(k);
        }
        gather4(o, v, w, Cg);
      }
    }
  }
}

template <typename T>
void forward_impl(const char* op, const DcnSizes& n, const T* in, const T* off, const T* msk, T* out) {
  const Grid grid = grid_of(n);
  parallel_for(op, 0, n.N * n.Ho, grain(n.Wo * n.G * n.K * n.Cg * 4), [&](int64_t begin, int64_t end) {
    std::vector<T> m(n.K), zeros(n.Cg, T(0));
    for (int64_t row = begin; row < end; ++row) forward_row(n, grid, row, in, off, msk, out, m.data(), zeros.data());
  });
}

// One (n, g): dinput[n, :, :, g, :] (owned: zeroed, then every output's
// corners added in a fixed order) and doffset / dmask of the group's outputs.
template <typename T>
FV_CPU_CLONES void backward_task(const DcnSizes& n, const Grid& grid, int64_t task, const T* dout, const T* in,
                                 const T* off, const T* msk, T* din, T* doff, T* dmsk, T* m, T* dm,
                                 const T* zeros, T* sink) {
  const T s = T(n.scale);
  const int64_t G = n.G, K = n.K, Cg = n.Cg, C = n.C, HW = n.H * n.W, Q = n.Ho * n.Wo;
  const int64_t b = task / G, g = task % G;
  const T* image = in + b * HW * C + g * Cg;
  T* dimage = din + b * HW * C + g * Cg;
  for (int64_t pix = 0; pix < HW; ++pix) std::fill(dimage + pix * C, dimage + pix * C + Cg, T(0));
  for (int64_t qq = 0; qq < Q; ++qq) {
    const int64_t ho = qq / n.Wo, wo = qq % n.Wo, q = b * Q + qq;
    const T bx = grid_base(wo, n.sw, n.pw, n.dw, n.kw, s), by = grid_base(ho, n.sh, n.ph, n.dh, n.kh, s);
    const T* go = dout + q * C + g * Cg;
    load_weights(msk + (q * G + g) * K, K, n.softmax, m);
    const T* offs = off + (q * G + g) * K * 2;
    T* doffs = doff + (q * G + g) * K * 2;
    for (int64_t p = 0; p < K; ++p) {
      T x, y;
      grid.point(p, bx, by, s, offs, &x, &y);
      const Bilinear<T> bl = bilinear_at(y, x, n.H, n.W);
      T val = 0, gx = 0, gy = 0;
      if (bl.valid[0] || bl.valid[1] || bl.valid[2] || bl.valid[3]) {
        const T* v[4];
        T* dv[4];
        T a[4], d[4];  // d[k] = dout . corner value
        for (int k = 0; k < 4; ++k) {
          const int64_t at = bl.index(k, n.W) * C;
          v[k] = bl.valid[k] ? image + at : zeros;
          dv[k] = bl.valid[k] ? dimage + at : sink + k * Cg;
          a[k] = m[p] * bl.weight(k);
        }
        scatter4(go, v, dv, a, d, Cg);
        for (int k = 0; k < 4; ++k) {
          val += bl.weight(k) * d[k];
          gx += bl.dwx(k) * d[k];
          gy += bl.dwy(k) * d[k];
        }
      }
      dm[p] = val;
      doffs[2 * p] = m[p] * gx * s;
      doffs[2 * p + 1] = m[p] * gy * s;
    }
    T* dms = dmsk + (q * G + g) * K;
    if (n.softmax) {  // d logit_p = m_p (dm_p - sum_j m_j dm_j)
      T sum = 0;
      for (int64_t p = 0; p < K; ++p) sum += m[p] * dm[p];
      for (int64_t p = 0; p < K; ++p) dms[p] = m[p] * (dm[p] - sum);
    } else {
      std::copy(dm, dm + K, dms);
    }
  }
}

template <typename T>
void backward_impl(const char* op, const DcnSizes& n, const T* dout, const T* in, const T* off, const T* msk,
                   T* din, T* doff, T* dmsk) {
  const Grid grid = grid_of(n);
  parallel_for(op, 0, n.N * n.G, grain(n.Ho * n.Wo * n.K * n.Cg * 12), [&](int64_t begin, int64_t end) {
    std::vector<T> m(n.K), dm(n.K), zeros(n.Cg, T(0)), sink(4 * n.Cg);
    for (int64_t task = begin; task < end; ++task)
      backward_task(n, grid, task, dout, in, off, msk, din, doff, dmsk, m.data(), dm.data(), zeros.data(),
                    sink.data());
  });
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp).

template <typename T>
const T* ptr(const Tensor& t) { return t.const_data_ptr<T>(); }

Tensor dcn_fwd_cpu(Tensor input, Tensor offset, Tensor mask, std::vector<int64_t> kernel_size,
                   std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                   int64_t group, double offset_scale, bool remove_center, bool mask_softmax) {
  constexpr const char* op = "dcn_fwd";
  const DcnSizes n = check_dcn_inputs(op, input, offset, mask, kernel_size, stride, padding, dilation, group,
                                      offset_scale, remove_center, mask_softmax);
  const Tensor in = widen(op, "input", input, n.acc), of = widen(op, "offset", offset, n.acc),
               mk = widen(op, "mask", mask, n.acc);
  Tensor out = alloc_empty(op, "out", input, {n.N, n.Ho, n.Wo, n.C}, n.acc);
  if (n.acc == ScalarType::Double)
    forward_impl<double>(op, n, ptr<double>(in), ptr<double>(of), ptr<double>(mk), out.mutable_data_ptr<double>());
  else
    forward_impl<float>(op, n, ptr<float>(in), ptr<float>(of), ptr<float>(mk), out.mutable_data_ptr<float>());
  return alloc_cast(op, "out", out, n.dtype);
}

std::tuple<Tensor, Tensor, Tensor> dcn_bwd_cpu(Tensor dout, Tensor input, Tensor offset, Tensor mask,
                                               std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                                               std::vector<int64_t> padding, std::vector<int64_t> dilation,
                                               int64_t group, double offset_scale, bool remove_center,
                                               bool mask_softmax) {
  constexpr const char* op = "dcn_bwd";
  const DcnSizes n = check_dcn_inputs(op, input, offset, mask, kernel_size, stride, padding, dilation, group,
                                      offset_scale, remove_center, mask_softmax);
  check_dcn_dout(op, n, dout, input);
  const Tensor in = widen(op, "input", input, n.acc), of = widen(op, "offset", offset, n.acc),
               mk = widen(op, "mask", mask, n.acc), go = widen(op, "dout", dout, n.acc);
  Tensor din = alloc_empty(op, "dinput", input, sizes_of(input), n.acc);
  Tensor doff = alloc_empty(op, "doffset", input, sizes_of(offset), n.acc);
  Tensor dmsk = alloc_empty(op, "dmask", input, sizes_of(mask), n.acc);
  if (n.acc == ScalarType::Double)
    backward_impl<double>(op, n, ptr<double>(go), ptr<double>(in), ptr<double>(of), ptr<double>(mk),
                          din.mutable_data_ptr<double>(), doff.mutable_data_ptr<double>(),
                          dmsk.mutable_data_ptr<double>());
  else
    backward_impl<float>(op, n, ptr<float>(go), ptr<float>(in), ptr<float>(of), ptr<float>(mk),
                         din.mutable_data_ptr<float>(), doff.mutable_data_ptr<float>(),
                         dmsk.mutable_data_ptr<float>());
  return {alloc_cast(op, "dinput", din, n.dtype), alloc_cast(op, "doffset", doff, n.dtype),
          alloc_cast(op, "dmask", dmsk, n.dtype)};
}

}  // namespace
}  // namespace fastvision::dcn

STABLE_TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("dcn_fwd", TORCH_BOX(&fastvision::dcn::dcn_fwd_cpu));
  m.impl("dcn_bwd", TORCH_BOX(&fastvision::dcn::dcn_bwd_cpu));
}
