// Every fastvision op schema, in one place: the library's table of contents.
// Kernels register per device in csrc/<family>/{cpu.cpp,cuda.cu}; the Triton
// (GPU) kernels register from Python (fastvision/ops/<family>.py).
//
// Forward and backward are separate ops; autograd, fake kernels and argument
// checks live in the Python wrappers.

#include <Python.h>
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(fastvision, m) {
  // ---- selective scan (Mamba S6; Vision Mamba) ------------------------------
  // u, delta, z: (batch, dim, L); A: (dim, N); B, C: (dim, N) or (batch, G, N, L);
  // D, delta_bias: (dim,). chunk_states holds the state after every chunk of
  // chunk_len steps (processing order), the checkpoints the backward restarts from.
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, "
      "Tensor? z, Tensor delta_bias, bool delta_softplus, bool reverse, int chunk_len) "
      "-> (Tensor out, Tensor last_state, Tensor chunk_states)");
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, "
      "Tensor B, Tensor C, Tensor D, Tensor? z, Tensor delta_bias, Tensor chunk_states, "
      "bool delta_softplus, bool reverse, int chunk_len) "
      "-> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, "
      "Tensor ddelta_bias)");
  // Vim's bidirectional scan: forward over the first set, reverse (t = L-1 .. 0)
  // over the *_b set, both gated by silu(z), summed. The backward is two
  // selective_scan_bwd calls.
  m.def(
      "bi_selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, "
      "Tensor? z, Tensor delta_bias, Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, "
      "Tensor C_b, Tensor D_b, Tensor delta_bias_b, bool delta_softplus, int chunk_len) "
      "-> (Tensor out, Tensor chunk_states, Tensor chunk_states_b)");

  // ---- neighborhood attention (NA / dilated NA; NAT, DiNAT) -----------------
  // Layout heads-last, as NATTEN: query (batch, *spatial, heads, D) with 1-3
  // spatial axes, key (batch, *spatial, kv_heads, D), value (batch, *spatial,
  // kv_heads, Dv), kv_heads dividing heads; all contiguous. kernel_size,
  // dilation, stride, is_causal: one entry per spatial axis (window rule in
  // csrc/neighborhood/neighborhood.h). rpb (heads, 2k0-1[, 2k1-1[, 2k2-1]])
  // or None; only with stride 1 and no causal axis. lse (batch, *spatial,
  // heads) is float32 (float64 for float64 inputs); dlse None when lse has
  // no gradient; drpb is an empty tensor when rpb is None.
  m.def(
      "na_fwd(Tensor query, Tensor key, Tensor value, Tensor? rpb, int[] kernel_size, "
      "int[] dilation, int[] stride, bool[] is_causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "na_bwd(Tensor dout, Tensor? dlse, Tensor query, Tensor key, Tensor value, Tensor? rpb, "
      "Tensor out, Tensor lse, int[] kernel_size, int[] dilation, int[] stride, bool[] is_causal, "
      "float scale) -> (Tensor dquery, Tensor dkey, Tensor dvalue, Tensor drpb)");

  // ---- criss-cross attention (CCNet; mmcv's einsum CrissCrossAttention) ----
  // NCHW: query, key (batch, Cqk, H, W), value (batch, C, H, W), one dtype,
  // contiguous. Query (h, w) attends to its column (keys (i, w), i != h) and
  // its row (keys (h, j), all j) in one softmax over the H + W logits q . k
  // (no scaling). lse (batch, H, W) is float32 (float64 for float64 inputs).
  m.def("criss_cross_fwd(Tensor query, Tensor key, Tensor value) -> (Tensor out, Tensor lse)");
  m.def(
      "criss_cross_bwd(Tensor dout, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse) "
      "-> (Tensor dquery, Tensor dkey, Tensor dvalue)");

  // ---- multi-scale deformable attention (Deformable DETR) -------------------
  // value (N, S, M, D), S = sum_l H_l W_l, the levels' (H_l, W_l) row-major
  // maps concatenated; value_spatial_shapes (L, 2) int64 (H_l, W_l);
  // value_level_start_index (L,) int64, their exclusive cumsum (checked);
  // sampling_locations (N, Lq, M, L, P, 2) as (x, y) in [0, 1] (outside reads
  // zeros); attention_weights (N, Lq, M, L, P); out (N, Lq, M * D). A point
  // samples level l at pixel (y H_l - 0.5, x W_l - 0.5), bilinear, zeros outside
  // (csrc/common/bilinear.h), as ms_deform_attn_core_pytorch's grid_sample.
  m.def(
      "ms_deform_attn_fwd(Tensor value, Tensor value_spatial_shapes, Tensor value_level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor out");
  m.def(
      "ms_deform_attn_bwd(Tensor dout, Tensor value, Tensor value_spatial_shapes, "
      "Tensor value_level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor dvalue, Tensor dsampling_locations, Tensor dattention_weights)");

  // ---- mask codecs: COCO RLE (pycocotools' format), Text4Seg R-RLE -----------
  // Not differentiable. A batch of N RLEs is counts (all masks' counts,
  // concatenated; int64), offsets (N + 1; mask i owns counts[offsets[i]:offsets[i+1]])
  // and sizes (N, 2) = (h, w) per mask; counts read column-major, alternating
  // runs starting with zeros, summing to h * w (every op checks). Compressed
  // strings travel as chars (uint8, concatenated) and char_offsets (N + 1).
  // masks (N, H, W) uint8/bool, row-major or column-major (strides (H*W, 1, H)).
  m.def("rle_encode(Tensor masks) -> (Tensor counts, Tensor offsets)");
  // uint8 0/1 masks: (N, W, H) when column_major (a Fortran (H, W, N) array's memory), else (N, H, W).
  m.def("rle_decode(Tensor counts, Tensor offsets, Tensor sizes, bool column_major) -> Tensor");
  m.def("rle_to_string(Tensor counts, Tensor offsets, Tensor sizes) -> (Tensor chars, Tensor char_offsets)");
  m.def("rle_from_string(Tensor chars, Tensor char_offsets, Tensor sizes) -> (Tensor counts, Tensor offsets)");
  m.def("rle_area(Tensor counts, Tensor offsets, Tensor sizes) -> Tensor");
  m.def("rle_to_bbox(Tensor counts, Tensor offsets, Tensor sizes) -> Tensor");
  // (D, G) float64; iscrowd (G,) bool/uint8.
  m.def(
      "rle_iou(Tensor dt_counts, Tensor dt_offsets, Tensor dt_sizes, Tensor gt_counts, Tensor gt_offsets, "
      "Tensor gt_sizes, Tensor iscrowd) -> Tensor");
  m.def("rle_merge(Tensor counts, Tensor offsets, Tensor sizes, bool intersect) -> Tensor");
  // xy (total,) float64: every polygon's x0, y0, x1, y1, ... concatenated; poly_offsets (P + 1,).
  m.def("rle_from_polygons(Tensor xy, Tensor poly_offsets, int h, int w) -> (Tensor counts, Tensor offsets)");
  // R-RLE: labels (B, h, w) or (h, w) int64 indexing names (UTF-8 bytes, concatenated,
  // name_offsets (K + 1,)); form 0 row-wise runs, 1 image-wise runs, 2 one label per patch
  // (-1: detect, decode only). Texts travel as UTF-8 bytes, concatenated, and text_offsets (B + 1,).
  m.def(
      "rrle_encode(Tensor labels, Tensor names, Tensor name_offsets, str run_sep, str row_sep, str count_sep, "
      "str end, int form) -> (Tensor text, Tensor text_offsets)");
  // names / name_offsets: the known labels (ids 0..K-1; may be empty). -> labels (B, h, w)
  // int64: known names' ids, then other labels' in order of first appearance; `fill` where
  // nothing was decoded to fill with (-1: left -1); all labels' bytes and offsets (the known
  // names first); repairs (R, 5) int64 (text, kind, row, column, occurrences).
  m.def(
      "rrle_decode(Tensor text, Tensor text_offsets, Tensor names, Tensor name_offsets, int fill, int h, int w, "
      "str run_sep, str row_sep, str count_sep, str end, bool strict, int form) -> (Tensor labels, "
      "Tensor label_bytes, Tensor label_offsets, Tensor repairs)");

  // ---- DCNv3 / DCNv4 aggregation (InternImage's DCNv3 op; DCNv4) -------------
  // Channels-last: input (N, H, W, group * Cg); offset (N, Ho, Wo, group * K * 2),
  // (dx, dy) pixel pairs; mask (N, Ho, Wo, group * K), softmax-ed over each
  // group's K points in the kernel when mask_softmax; out (N, Ho, Wo, group * Cg).
  // kernel_size, stride, padding, dilation: [h, w]; K = kh * kw (- 1 with
  // remove_center); kernel points x outer, y inner; sampling rule in
  // csrc/dcn/cpu.cpp. One dtype, contiguous.
  m.def(
      "dcn_fwd(Tensor input, Tensor offset, Tensor mask, int[] kernel_size, int[] stride, int[] padding, "
      "int[] dilation, int group, float offset_scale, bool remove_center, bool mask_softmax) -> Tensor out");
  m.def(
      "dcn_bwd(Tensor dout, Tensor input, Tensor offset, Tensor mask, int[] kernel_size, int[] stride, "
      "int[] padding, int[] dilation, int group, float offset_scale, bool remove_center, bool mask_softmax) "
      "-> (Tensor dinput, Tensor doffset, Tensor dmask)");

  // ---- super token attention (STViT) -----------------------------------------
  // x (batch, C, H0, W0), stoken_size [h, w]: x is zero-padded (right, bottom) to
  // hh * h by ww * w, hh = ceil(H0 / h), ww = ceil(W0 / w). stokens (batch, C, hh, ww)
  // in x's dtype; affinity (batch, hh*ww, h*w, 9): every pixel's softmax over the
  // 3x3 neighbour tokens of its cell (k = 3 * dy + dx), float32 (float64 for
  // float64 x); asum (batch, hh, ww): each token's affinity sum, the denominators.
  // size [H0, W0] is x's spatial size; out_size the upsampled (cropped) one.
  // upsample_bwd with affinity_grad=False skips daffinity and returns it empty, shape (0,).
  m.def(
      "super_token_sampling_fwd(Tensor x, int[] stoken_size, int n_iter) "
      "-> (Tensor stokens, Tensor affinity, Tensor asum)");
  m.def(
      "super_token_sampling_bwd(Tensor dstokens, Tensor affinity, Tensor asum, int[] stoken_size, "
      "int[] size) -> Tensor dx");
  m.def(
      "super_token_upsample_fwd(Tensor stokens, Tensor affinity, int[] stoken_size, int[] out_size) "
      "-> Tensor out");
  m.def(
      "super_token_upsample_bwd(Tensor dout, Tensor stokens, Tensor affinity, int[] stoken_size, "
      "bool affinity_grad=True) -> (Tensor dstokens, Tensor daffinity)");

  // ---- deformable convolution (DCNv1 / DCNv2; torchvision's deform_conv2d) --
  // NCHW: input (batch, Cin, H, W); offset (batch, 2 * G * kh * kw, Ho, Wo),
  // the (dy, dx) pairs of every kernel point (row-major kernel order) of each
  // of G offset groups (Cin % G == 0); mask (batch, G * kh * kw, Ho, Wo) or
  // None (DCNv1: all ones); weight (Cout, Cin / groups, kh, kw), groups =
  // Cin / weight.shape[1]; bias (Cout,) or None; stride, padding, dilation
  // [h, w]. Zero-padding bilinear sampling (csrc/common/bilinear.h). dmask is
  // an empty tensor when mask is None; the bias gradient is dout's sum.
  m.def(
      "deform_conv2d_fwd(Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask, "
      "int[] stride, int[] padding, int[] dilation) -> Tensor out");
  m.def(
      "deform_conv2d_bwd(Tensor dout, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
      "int[] stride, int[] padding, int[] dilation) "
      "-> (Tensor dinput, Tensor doffset, Tensor dweight, Tensor dmask)");
}

// Plain CPython functions beside the ops (the mask codecs' Python-object paths,
// csrc/masks/pyapi.h).
PyMethodDef* fastvision_python_methods();

// `import fastvision._C` loads the schemas and CPU kernels (static
// registration) and those functions. Limited API: one file per ABI.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastvision_python_methods()};
  return PyModule_Create(&module);
}
