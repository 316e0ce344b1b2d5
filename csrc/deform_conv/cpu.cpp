// CPU kernels of deformable convolution (DCNv1 / DCNv2), torchvision's
// deform_conv2d: out[b, o, p] = bias[o] + sum_{c, k} weight[o, c, k] *
// mask[b, g(c), k, p] * sample(input[b, c], y, x), the sample point
// (y, x) = (ph0 * sh - pad_h + i * dh + dy, pw0 * sw - pad_w + j * dw + dx)
// of kernel point k = (i, j) moved by its offset (dy, dx) of offset group g(c),
// bilinear with zeros outside the image (csrc/common/bilinear.h).
//
// Everything is channel-last inside (the input is transposed once per call),
// so that sampling a point reads its four corners as contiguous rows of
// channels and every step vectorises over channels:
//  - columns colT[p][gw][k][cw] (p: output position, gw: weight group, cw:
//    channel in the group) are sampled per tile of positions into
//    per-thread scratch, and the tile's output is one matrix product per
//    weight group (fma_scalars of common/gemm.h): no column buffer for the
//    whole image;
//  - backward, per image: dcolT = dout^T W (one product per group and
//    tile); doffset and dmask from dcolT and the corner rows; dweight =
//    dout colT, a fixed-order sum over positions; dinput by gathering: the
//    (sample, corner) pairs are bucketed by the pixel they touch (a counting
//    sort in sample order), and each pixel sums its pairs in that order.
//    No scatter, no atomics: deterministic, whatever the thread count.
//
// float and double kernels; half and bfloat16 are widened to float on entry
// (fp32 accumulation) and the results narrowed on exit.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/alloc.h"
#include "../common/bilinear.h"
#include "../common/check.h"
#include "../common/common.h"
#include "../common/dtype.h"
#include "../common/gemm.h"
#include "../common/parallel.h"
#include "../common/transpose.h"
#include "checks.h"

namespace fastvision::dc {
namespace {

// A run of channels [c0, c0 + n) inside one offset group `go` and one weight
// group: its columns sit at col + k * Cg + off in a position's row of colT.
struct Run {
  int64_t c0, n, go, off;
};

struct Geometry {
  DcSizes n;
  int64_t KC = 0;  // columns per position: Cin * K
  int64_t P = 0;   // positions per image: Ho * Wo
  int64_t HW = 0;
  std::vector<Run> runs;

  explicit Geometry(const DcSizes& s) : n(s), KC(s.Cin * s.K), P(s.Ho * s.Wo), HW(s.H * s.W) {
    for (int64_t c = 0; c < n.Cin;) {
      const int64_t go = c / n.Cog, gw = c / n.Cg;
      const int64_t end = std::min((go + 1) * n.Cog, (gw + 1) * n.Cg);
      runs.push_back({c, end - c, go, gw * n.K * n.Cg + (c - gw * n.Cg)});
      c = end;
    }
  }

  // The bilinear corners of kernel point k of offset group go at position p
  // of image b (offset / mask planes of that image).
  template <typename T>
  Bilinear<T> sample(const T* off_b, int64_t go, int64_t k, int64_t p) const {
    T y, x;
    point(off_b, go, k, p, y, x);
    return bilinear_at<T>(y, x, n.H, n.W);
  }

  // The sample point (y, x) of kernel point k of offset group go at position p.
  template <typename T>
  void point(const T* off_b, int64_t go, int64_t k, int64_t p, T& y, T& x) const {
    const int64_t oh = p / n.Wo, ow = p % n.Wo, i = k / n.kw, j = k % n.kw;
    const T* o = off_b + (go * 2 * n.K + 2 * k) * P + p;
    y = T(oh * n.sh - n.ph + i * n.dh) + o[0];
    x = T(ow * n.sw - n.pw + j * n.dw) + o[P];
  }
};

// inT[b][pix][c] = input[b][c][pix], in parallel over (image, pixel blocks).
template <typename T>
void to_channel_last(const char* op, const T* in, int64_t B, int64_t C, int64_t HW, T* out) {
  constexpr int64_t kPix = 256;
  const int64_t blocks = ceil_div(HW, kPix);
  parallel_for(op, 0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, p0 = (t % blocks) * kPix, np = std::min(kPix, HW - p0);
      transpose(in + b * C * HW + p0, C, np, HW, out + (b * HW + p0) * C, C);
    }
  });
}

// Corner rows of a sample: pointers to the channel-last rows of its four
// pixels (a row of zeros for corners outside the image).
template <typename T>
struct Corners {
  const T* row[4];
  T w[4];
  Corners(const Bilinear<T>& s, const T* inT_b, int64_t Cin, int64_t W, const T* zeros) {
    for (int q = 0; q < 4; ++q) {
      row[q] = s.valid[q] ? inT_b + s.index(q, W) * Cin : zeros;
      w[q] = s.weight(q);
    }
  }
};

// colT rows of positions [p0, p0 + np) of image b: colT[p][off + k * Cg + e] =
// mask * (w0 v0 + w1 v1 + w2 v2 + w3 v3) for channel c0 + e of each run.
template <typename T>
FV_CPU_CLONES void sample_columns(const Geometry& g, const T* inT_b, const T* off_b, const T* mask_b, int64_t p0,
                                  int64_t np, const T* zeros, T* colT) {
  const DcSizes& n = g.n;
  for (int64_t p = p0; p < p0 + np; ++p) {
    T* row = colT + (p - p0) * g.KC;
    for (int64_t go = 0; go < n.G; ++go)
      for (int64_t k = 0; k < n.K; ++k) {
        const Corners<T> cr(g.sample(off_b, go, k, p), inT_b, n.Cin, n.W, zeros);
        const T m = mask_b ? mask_b[(go * n.K + k) * g.P + p] : T(1);
        for (const Run& r : g.runs) {
          if (r.go != go) continue;
          T* dst = row + r.off + k * n.Cg;
          const T *v0 = cr.row[0] + r.c0, *v1 = cr.row[1] + r.c0, *v2 = cr.row[2] + r.c0, *v3 = cr.row[3] + r.c0;
#pragma omp simd
          for (int64_t e = 0; e < r.n; ++e)
            dst[e] = m * (cr.w[0] * v0[e] + cr.w[1] * v1[e] + cr.w[2] * v2[e] + cr.w[3] * v3[e]);
        }
      }
  }
}

// Positions per tile: a tile's columns (np x Cin * K) stay within ~256 KB of float.
int64_t tile_positions(const Geometry& g) {
  return std::clamp<int64_t>(65536 / std::max<int64_t>(g.KC, 1) / 4 * 4, 4, 128);
}

// Weights rearranged for the products: WrT[gw][k][cw][o] = weight[gw * Og + o][cw][k]
// (forward: columns x WrT) and W2[co][k][cw] = weight[co][cw][k] (backward: dout x W2).
template <typename T>
std::vector<T> weights_wrt(const char* op, const DcSizes& n, const T* w) {
  std::vector<T> out = host_vector<T>(op, "rearranged weight", n.Cout * n.Cg * n.K);
  for (int64_t gw = 0; gw < n.groups; ++gw)
    for (int64_t o = 0; o < n.Og; ++o)
      for (int64_t cw = 0; cw < n.Cg; ++cw)
        for (int64_t k = 0; k < n.K; ++k)
          out[((gw * n.K + k) * n.Cg + cw) * n.Og + o] = w[((gw * n.Og + o) * n.Cg + cw) * n.K + k];
  return out;
}

template <typename T>
std::vector<T> weights_w2(const char* op, const DcSizes& n, const T* w) {
  std::vector<T> out = host_vector<T>(op, "rearranged weight", n.Cout * n.Cg * n.K);
  for (int64_t co = 0; co < n.Cout; ++co)
    for (int64_t cw = 0; cw < n.Cg; ++cw)
      for (int64_t k = 0; k < n.K; ++k) out[(co * n.K + k) * n.Cg + cw] = w[(co * n.Cg + cw) * n.K + k];
  return out;
}

// ---------------------------------------------------------------------------
// Forward: tasks of (image, tile of positions).

template <typename T>
Tensor forward_impl(const char* op, const Geometry& g, const Tensor& input, const Tensor& offset,
                    const std::optional<Tensor>& mask, const Tensor& weight, const std::optional<Tensor>& bias) {
  const DcSizes& n = g.n;
  Tensor out = alloc_empty(op, "out", input, {n.B, n.Cout, n.Ho, n.Wo}, acc_scalar_type<T>());
  if (out.numel() == 0) return out;
  T* O = out.mutable_data_ptr<T>();
  const T* bias_p = bias ? bias->const_data_ptr<T>() : nullptr;
  std::vector<T> inT = host_vector<T>(op, "channel-last input", n.B * g.HW * n.Cin);
  to_channel_last(op, input.const_data_ptr<T>(), n.B, n.Cin, g.HW, inT.data());
  const std::vector<T> wrt = weights_wrt(op, n, weight.const_data_ptr<T>());
  const T* OFF = offset.const_data_ptr<T>();
  const T* M = mask ? mask->const_data_ptr<T>() : nullptr;
  const int64_t PT = tile_positions(g), tiles = ceil_div(g.P, PT);
  parallel_for(op, 0, n.B * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> colT = host_vector<T>(op, "column tile", PT * g.KC);
    std::vector<T> outT = host_vector<T>(op, "output tile", PT * n.Cout);
    const std::vector<T> zeros = host_vector<T>(op, "zero row", n.Cin);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / tiles, p0 = (t % tiles) * PT, np = std::min(PT, g.P - p0);
      sample_columns(g, inT.data() + b * g.HW * n.Cin, OFF + b * 2 * n.G * n.K * g.P,
                     M ? M + b * n.G * n.K * g.P : nullptr, p0, np, zeros.data(), colT.data());
      for (int64_t gw = 0; gw < n.groups; ++gw)  // outT[p][gw * Og + o] = sum_r colT[p][gw][r] WrT[gw][r][o]
        fma_scalars(outT.data() + gw * n.Og, np, n.Cout, wrt.data() + gw * n.K * n.Cg * n.Og, n.Og,
                    colT.data() + gw * n.K * n.Cg, g.KC, int64_t{1}, n.K * n.Cg, n.Og, false);
      T* Ob = O + b * n.Cout * g.P + p0;
      transpose(outT.data(), np, n.Cout, n.Cout, Ob, g.P);
      if (bias_p)
        for (int64_t co = 0; co < n.Cout; ++co)
          for (int64_t p = 0; p < np; ++p) Ob[co * g.P + p] += bias_p[co];
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// Backward, one image at a time (parallel inside).

// The (sample, corner) pairs of offset group go, bucketed by input pixel:
// pixel q's pairs are [start[q], start[q + 1]), in sample order (p, k, corner);
// src is the pair's column offset in dcolT without its run's part
// (p * KC + k * Cg), w its weight mask * bilinear weight.
template <typename T>
struct PixelPairs {
  std::vector<int64_t> start, src;
  std::vector<T> w;
};

template <typename T>
void bucket_pairs(const char* op, const Geometry& g, const T* off_b, const T* mask_b, int64_t go, PixelPairs<T>& pp) {
  const DcSizes& n = g.n;
  pp.start.assign(g.HW + 1, 0);
  for (int pass = 0; pass < 2; ++pass) {  // count, then fill
    if (pass == 1) {
      for (int64_t q = 0; q < g.HW; ++q) pp.start[q + 1] += pp.start[q];
      pp.src = host_vector<int64_t>(op, "input-gradient pairs", pp.start[g.HW]);
      pp.w = host_vector<T>(op, "input-gradient pairs", pp.start[g.HW]);
    }
    std::vector<int64_t> next;
    if (pass == 1) next.assign(pp.start.begin(), pp.start.end() - 1);
    for (int64_t p = 0; p < g.P; ++p)
      for (int64_t k = 0; k < n.K; ++k) {
        const Bilinear<T> s = g.sample(off_b, go, k, p);
        const T m = mask_b ? mask_b[(go * n.K + k) * g.P + p] : T(1);
        for (int q = 0; q < 4; ++q) {
          if (!s.valid[q]) continue;
          const int64_t pix = s.index(q, n.W);
          if (pass == 0) {
            ++pp.start[pix + 1];
          } else {
            const int64_t e = next[pix]++;
            pp.src[e] = p * g.KC + k * n.Cg;
            pp.w[e] = m * s.weight(q);
          }
        }
      }
  }
}

// doffset and dmask of positions [p0, p0 + np): with t_q = sum_c dcol[c] v_q[c]
// over the channels of the offset group, d/dy = mask sum_q dwy_q t_q, d/dx
// likewise, dmask = sum_q w_q t_q (the sample itself, weighted by dcol).
// torchvision's rules: the coordinate derivatives take the corners alone
// (bilinear_corners_only_at: one-sided at y == -1 / x == -1, where the sample
// reads 0), dmask is the sample (0 outside the sampling range).
template <typename T>
FV_CPU_CLONES void offset_mask_grads(const Geometry& g, const T* inT_b, const T* off_b, const T* mask_b,
                                     const T* dcolT, int64_t p0, int64_t np, const T* zeros, T* doff_b, T* dmask_b) {
  const DcSizes& n = g.n;
  for (int64_t p = p0; p < p0 + np; ++p)
    for (int64_t go = 0; go < n.G; ++go)
      for (int64_t k = 0; k < n.K; ++k) {
        T y, x;
        g.point(off_b, go, k, p, y, x);
        // the same corners as bilinear_at inside the sampling range
        const Bilinear<T> s = bilinear_corners_only_at<T>(y, x, n.H, n.W);
        const bool in_range = bilinear_in_range<T>(y, x, n.H, n.W);
        const Corners<T> cr(s, inT_b, n.Cin, n.W, zeros);
        T t[4] = {0, 0, 0, 0};
        for (const Run& r : g.runs) {
          if (r.go != go) continue;
          const T* d = dcolT + p * g.KC + r.off + k * n.Cg;
          for (int q = 0; q < 4; ++q) {
            const T* v = cr.row[q] + r.c0;
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t e = 0; e < r.n; ++e) acc += d[e] * v[e];
            t[q] += acc;
          }
        }
        const T m = mask_b ? mask_b[(go * n.K + k) * g.P + p] : T(1);
        T dy = 0, dx = 0, dm = 0;
        for (int q = 0; q < 4; ++q) {
          dy += s.dwy(q) * t[q];
          dx += s.dwx(q) * t[q];
          if (in_range) dm += s.weight(q) * t[q];
        }
        doff_b[(go * 2 * n.K + 2 * k) * g.P + p] = m * dy;
        doff_b[(go * 2 * n.K + 2 * k + 1) * g.P + p] = m * dx;
        if (dmask_b) dmask_b[(go * n.K + k) * g.P + p] = dm;
      }
}

// dinT[q][c] = sum over pixel q's pairs of w * dcolT[src + run part + e], for pixels [q0, q1).
template <typename T>
FV_CPU_CLONES void gather_input_grads(const Geometry& g, const PixelPairs<T>& pp, int64_t go, const T* dcolT,
                                      int64_t q0, int64_t q1, T* dinT) {
  for (int64_t q = q0; q < q1; ++q)
    for (const Run& r : g.runs) {
      if (r.go != go) continue;
      T* dst = dinT + q * g.n.Cin + r.c0;
      for (int64_t e = 0; e < r.n; ++e) dst[e] = T(0);
      for (int64_t i = pp.start[q]; i < pp.start[q + 1]; ++i) {
        const T* src = dcolT + pp.src[i] + r.off;
        const T w = pp.w[i];
#pragma omp simd
        for (int64_t e = 0; e < r.n; ++e) dst[e] += w * src[e];
      }
    }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> backward_impl(const char* op, const Geometry& g, const Tensor& dout,
                                                         const Tensor& input, const Tensor& offset,
                                                         const std::optional<Tensor>& mask, const Tensor& weight) {
  const DcSizes& n = g.n;
  const ScalarType acc = acc_scalar_type<T>();
  Tensor dinput = alloc_empty(op, "dinput", input, sizes_of(input), acc);
  Tensor doffset = alloc_empty(op, "doffset", input, sizes_of(offset), acc);
  Tensor dweight = alloc_zeros(op, "dweight", input, sizes_of(weight), acc);
  Tensor dmask = alloc_empty(op, "dmask", input, mask ? sizes_of(*mask) : std::vector<int64_t>{0}, acc);
  if (n.B == 0) return {dinput, doffset, dweight, dmask};
  const T* G = dout.const_data_ptr<T>();
  const T* IN = input.const_data_ptr<T>();
  const T* OFF = offset.const_data_ptr<T>();
  const T* M = mask ? mask->const_data_ptr<T>() : nullptr;
  T *DIN = dinput.mutable_data_ptr<T>(), *DOFF = doffset.mutable_data_ptr<T>();
  T* DM = mask ? dmask.mutable_data_ptr<T>() : nullptr;
  const std::vector<T> w2 = weights_w2(op, n, weight.const_data_ptr<T>());
  // dW2[co][k][cw], summed over images and positions in a fixed order.
  std::vector<T> dw2 = host_vector<T>(op, "weight gradient", n.Cout * n.K * n.Cg);
  std::vector<T> inT = host_vector<T>(op, "channel-last input", g.HW * n.Cin);
  std::vector<T> colT = host_vector<T>(op, "columns", g.P * g.KC);
  std::vector<T> dcolT = host_vector<T>(op, "column gradients", g.P * g.KC);
  std::vector<T> dinT = host_vector<T>(op, "channel-last input gradient", g.HW * n.Cin);
  std::vector<PixelPairs<T>> pairs(n.G);
  const int64_t PT = tile_positions(g), tiles = ceil_div(g.P, PT);
  const int64_t KCg = n.K * n.Cg;
  constexpr int64_t kLaneBlock = 64;  // dweight columns per task
  const int64_t lane_blocks = ceil_div(KCg, kLaneBlock);

  for (int64_t b = 0; b < n.B; ++b) {
    const T* off_b = OFF + b * 2 * n.G * n.K * g.P;
    const T* mask_b = M ? M + b * n.G * n.K * g.P : nullptr;
    const T* dout_b = G + b * n.Cout * g.P;
    to_channel_last(op, IN + b * n.Cin * g.HW, 1, n.Cin, g.HW, inT.data());
    // Columns, their gradients dcolT = dout^T W2 per group, doffset and dmask, per tile.
    parallel_for(op, 0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> doutT = host_vector<T>(op, "transposed dout tile", PT * n.Cout);
      const std::vector<T> zeros = host_vector<T>(op, "zero row", n.Cin);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p0 = t * PT, np = std::min(PT, g.P - p0);
        sample_columns(g, inT.data(), off_b, mask_b, p0, np, zeros.data(), colT.data() + p0 * g.KC);
        transpose(dout_b + p0, n.Cout, np, g.P, doutT.data(), n.Cout);
        for (int64_t gw = 0; gw < n.groups; ++gw)
          fma_scalars(dcolT.data() + p0 * g.KC + gw * KCg, np, g.KC, w2.data() + gw * n.Og * KCg, KCg,
                      doutT.data() + gw * n.Og, n.Cout, int64_t{1}, n.Og, KCg, false);
        offset_mask_grads(g, inT.data(), off_b, mask_b, dcolT.data(), p0, np, zeros.data(),
                          DOFF + b * 2 * n.G * n.K * g.P, DM ? DM + b * n.G * n.K * g.P : nullptr);
      }
    });
    // dW2[co][r] (+)= sum_p dout[co][p] colT[p][gw][r], tasks of (group, 64 columns).
    parallel_for(op, 0, n.groups * lane_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t gw = t / lane_blocks, l0 = (t % lane_blocks) * kLaneBlock;
        fma_scalars(dw2.data() + gw * n.Og * KCg + l0, n.Og, KCg, colT.data() + gw * KCg + l0, g.KC,
                    dout_b + gw * n.Og * g.P, g.P, int64_t{1}, g.P, std::min(kLaneBlock, KCg - l0), b > 0);
      }
    });
    // dinput: bucket the pairs of each offset group, then gather per pixel.
    parallel_for(op, 0, n.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t go = begin; go < end; ++go) bucket_pairs(op, g, off_b, mask_b, go, pairs[go]);
    });
    constexpr int64_t kPix = 64;
    const int64_t pix_blocks = ceil_div(g.HW, kPix);
    parallel_for(op, 0, n.G * pix_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t go = t / pix_blocks, q0 = (t % pix_blocks) * kPix;
        gather_input_grads(g, pairs[go], go, dcolT.data(), q0, std::min(g.HW, q0 + kPix), dinT.data());
      }
    });
    transpose(dinT.data(), g.HW, n.Cin, n.Cin, DIN + b * n.Cin * g.HW, g.HW);
  }
  T* DW = dweight.mutable_data_ptr<T>();  // dweight[co][cw][k] = dW2[co][k][cw]
  for (int64_t co = 0; co < n.Cout; ++co)
    for (int64_t cw = 0; cw < n.Cg; ++cw)
      for (int64_t k = 0; k < n.K; ++k) DW[(co * n.Cg + cw) * n.K + k] = dw2[(co * n.K + k) * n.Cg + cw];
  return {dinput, doffset, dweight, dmask};
}

// ---------------------------------------------------------------------------
// Op entry points (schemas in csrc/registration.cpp).

Tensor widen(const char* op, const char* what, const Tensor& t, ScalarType acc) {
  return alloc_cast(op, std::string(what) + " in " + dtype_name(acc), t, acc);
}

std::optional<Tensor> widen(const char* op, const char* what, const std::optional<Tensor>& t, ScalarType acc) {
  if (!t) return std::nullopt;
  return widen(op, what, *t, acc);
}

Tensor deform_conv2d_fwd_cpu(Tensor input, Tensor offset, Tensor weight, std::optional<Tensor> bias,
                             std::optional<Tensor> mask, std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation) {
  constexpr const char* op = "deform_conv2d_fwd";
  const DcSizes n = check_dc_inputs(op, input, offset, weight, mask, stride, padding, dilation);
  if (bias) {
    check_like_input(op, "bias", *bias, n, input);
    check_shape(op, "bias", *bias, {n.Cout}, "(out_channels,)");
  }
  const Geometry g(n);
  const Tensor in = widen(op, "input", input, n.acc), off = widen(op, "offset", offset, n.acc),
               w = widen(op, "weight", weight, n.acc);
  const std::optional<Tensor> m = widen(op, "mask", mask, n.acc), bi = widen(op, "bias", bias, n.acc);
  Tensor out = n.acc == ScalarType::Double ? forward_impl<double>(op, g, in, off, m, w, bi)
                                           : forward_impl<float>(op, g, in, off, m, w, bi);
  return alloc_cast(op, "out", out, n.dtype);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> deform_conv2d_bwd_cpu(Tensor dout, Tensor input, Tensor offset,
                                                                 Tensor weight, std::optional<Tensor> mask,
                                                                 std::vector<int64_t> stride,
                                                                 std::vector<int64_t> padding,
                                                                 std::vector<int64_t> dilation) {
  constexpr const char* op = "deform_conv2d_bwd";
  const DcSizes n = check_dc_inputs(op, input, offset, weight, mask, stride, padding, dilation);
  check_like_input(op, "dout", dout, n, input);
  check_shape(op, "dout", dout, {n.B, n.Cout, n.Ho, n.Wo}, "(batch, out_channels, Ho, Wo)");
  const Geometry g(n);
  const Tensor in = widen(op, "input", input, n.acc), off = widen(op, "offset", offset, n.acc),
               w = widen(op, "weight", weight, n.acc), go = widen(op, "dout", dout, n.acc);
  const std::optional<Tensor> m = widen(op, "mask", mask, n.acc);
  auto [di, doff, dw, dm] = n.acc == ScalarType::Double ? backward_impl<double>(op, g, go, in, off, m, w)
                                                        : backward_impl<float>(op, g, go, in, off, m, w);
  return {alloc_cast(op, "dinput", di, n.dtype), alloc_cast(op, "doffset", doff, n.dtype),
          alloc_cast(op, "dweight", dw, n.dtype), alloc_cast(op, "dmask", dm, n.dtype)};
}

}  // namespace
}  // namespace fastvision::dc

STABLE_TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("deform_conv2d_fwd", TORCH_BOX(&fastvision::dc::deform_conv2d_fwd_cpu));
  m.impl("deform_conv2d_bwd", TORCH_BOX(&fastvision::dc::deform_conv2d_bwd_cpu));
}
