// Argument checks of the selective scan entry points, shared by the CPU
// kernels (cpu.cpp) and the CUDA kernels (cuda.cu). They follow what the
// kernels read:
//   u, delta, z (optional), dout: (batch, dim, L), u's dtype
//   A: (dim, N), D and delta_bias: (dim,), in the accumulate dtype (float32;
//     float64 for float64 u)
//   B, C: (dim, N) constant or (batch, G, N, L) variable, G dividing dim, any
//     float dtype
//   chunk_states: (batch, dim, ceil(L / chunk_len), N), dlast_state:
//     (batch, dim, N), both in the accumulate dtype
// all contiguous and on one device. Host code only.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <string>

#include "../common/check.h"
#include "../common/common.h"

namespace fastvision::scan {

enum class Backend { CPU, CUDA };

// Sizes of one direction of the scan, as the kernels read them.
struct ScanSizes {
  int64_t batch = 0, dim = 0, L = 0, N = 0;
  bool var_B = false, var_C = false;
  int64_t groups_B = 1, groups_C = 1;
  ScalarType dtype = ScalarType::Float, acc = ScalarType::Float;
};

// Every tensor of one call lives where the kernel runs: the CPU, or u's CUDA device.
inline void check_device(const char* op, Backend be, const std::string& name, const Tensor& t, const Tensor& u,
                         const std::string& u_name) {
  if (be == Backend::CPU)
    check_cpu(op, name, t);
  else
    check_same_cuda_device(op, name, t, u_name, u);
}

// t has u's shape (batch, dim, L), u's dtype, is contiguous and on u's device.
inline void check_like_u(const char* op, Backend be, const std::string& name, const Tensor& t, const ScanSizes& s,
                         const Tensor& u, const std::string& u_name) {
  check_dtype_is(op, name, t, s.dtype, "the dtype of " + u_name);
  check_shape(op, name, t, {s.batch, s.dim, s.L}, "(batch, dim, L) like " + u_name);
  check_contiguous(op, name, t);
  check_device(op, be, name, t, u, u_name);
}

// A tensor in the accumulate dtype of exactly `shape` (named by `doc`).
inline void check_acc(const char* op, Backend be, const std::string& name, const Tensor& t, const ScanSizes& s,
                      const std::vector<int64_t>& shape, const std::string& doc, const Tensor& u,
                      const std::string& u_name) {
  check_dtype_is(op, name, t, s.acc,
                 "the accumulate dtype: float64 for float64 " + u_name + ", else float32; " + u_name + " is " +
                     dtype_name(s.dtype));
  check_shape(op, name, t, shape, doc);
  check_contiguous(op, name, t);
  check_device(op, be, name, t, u, u_name);
}

// B or C: (dim, N) constant or (batch, G, N, L) variable with G dividing dim.
inline void check_BC(const char* op, Backend be, const std::string& name, const Tensor& X, const ScanSizes& s,
                     const Tensor& u, const std::string& u_name, bool* variable, int64_t* groups) {
  check_dtype(op, name, X, be == Backend::CPU);
  if (X.dim() == 2) {
    check_shape(op, name, X, {s.dim, s.N}, "(dim, N) (constant over time)");
    *variable = false;
    *groups = 1;
  } else if (X.dim() == 4) {
    const int64_t G = X.size(1);
    FV_CHECK(G >= 1 && s.dim % G == 0, op, name, ": the number of groups G = ", G, " (", name,
             ".size(1)) must be >= 1 and divide dim = ", s.dim, "; got shape ", shape_str(X));
    check_shape(op, name, X, {s.batch, G, s.N, s.L}, "(batch, G, N, L)");
    *variable = true;
    *groups = G;
  } else {
    FV_CHECK(false, op, name, " must have shape (dim, N) = ", shape_str({s.dim, s.N}),
             " (constant) or (batch, G, N, L) = (", s.batch, ", G, ", s.N, ", ", s.L,
             ") with G dividing dim (variable; unsqueeze a (batch, N, L) tensor at dim 1); got shape ",
             shape_str(X));
  }
  check_contiguous(op, name, X);
  check_device(op, be, name, X, u, u_name);
}

// The tensors of one direction; `sfx` ("" or "_b") completes their names.
inline ScanSizes check_direction(const char* op, Backend be, const std::string& sfx, const Tensor& u,
                                 const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                                 const Tensor& D, const std::optional<Tensor>& z, const Tensor& delta_bias) {
  const auto name = [&](const char* base) { return std::string(base) + sfx; };
  const std::string un = name("u");
  check_dtype(op, un, u, be == Backend::CPU);
  check_rank(op, un, u, 3, "(batch, dim, L)");
  check_contiguous(op, un, u);
  if (be == Backend::CPU)
    check_cpu(op, un, u);
  else
    FV_CHECK(u.is_cuda(), op, un, " must be a CUDA tensor for the CUDA kernel; got a tensor on ", device_str(u));
  ScanSizes s;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.L = u.size(2);
  s.dtype = u.scalar_type();
  s.acc = s.dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  check_like_u(op, be, name("delta"), delta, s, u, un);
  if (z.has_value()) check_like_u(op, be, name("z"), *z, s, u, un);

  const std::string An = name("A");
  check_dtype_is(op, An, A, s.acc,
                 "the accumulate dtype: float64 for float64 " + un + ", else float32; " + un + " is " +
                     dtype_name(s.dtype));
  check_rank(op, An, A, 2, "(dim, N)");
  FV_CHECK(A.size(0) == s.dim, op, An, " must have shape (dim, N) with dim = ", s.dim, " (", un,
           ".size(1)); got shape ", shape_str(A));
  s.N = A.size(1);
  FV_CHECK(s.N >= 1, op, "the state size N = ", An, ".size(1) must be >= 1; got shape ", shape_str(A));
  check_contiguous(op, An, A);
  check_device(op, be, An, A, u, un);

  check_BC(op, be, name("B"), B, s, u, un, &s.var_B, &s.groups_B);
  check_BC(op, be, name("C"), C, s, u, un, &s.var_C, &s.groups_C);
  check_acc(op, be, name("D"), D, s, {s.dim}, "(dim,)", u, un);
  check_acc(op, be, name("delta_bias"), delta_bias, s, {s.dim}, "(dim,)", u, un);
  return s;
}

// chunk_len >= 1; returns the chunk length the kernels use: min(chunk_len, L)
// (at least 1), the same chunking with bounded scratch and no overflow in
// ceil(L / chunk_len).
inline int64_t check_chunk_len(const char* op, int64_t chunk_len, int64_t L) {
  check_at_least(op, "chunk_len", chunk_len, 1);
  return chunk_len < L ? chunk_len : (L > 0 ? L : 1);
}

// The second direction of the bidirectional scan must mirror the first.
inline void check_mirror(const char* op, const ScanSizes& f, const ScanSizes& r, const Tensor& A, const Tensor& A_b,
                         const Tensor& B, const Tensor& B_b, const Tensor& C, const Tensor& C_b) {
  FV_CHECK(r.batch == f.batch && r.dim == f.dim && r.L == f.L, op,
           "u_b must have u's shape (batch, dim, L) = ", shape_str({f.batch, f.dim, f.L}), "; got ",
           shape_str({r.batch, r.dim, r.L}));
  FV_CHECK(r.dtype == f.dtype, op, "u_b must have u's dtype ", dtype_name(f.dtype), "; got ", dtype_name(r.dtype));
  FV_CHECK(same_shape(A_b, sizes_of(A)), op, "A_b must have A's shape ", shape_str(A), "; got ", shape_str(A_b));
  FV_CHECK(same_shape(B_b, sizes_of(B)), op, "B_b must have B's shape ", shape_str(B), " (the same layout); got ",
           shape_str(B_b));
  FV_CHECK(same_shape(C_b, sizes_of(C)), op, "C_b must have C's shape ", shape_str(C), " (the same layout); got ",
           shape_str(C_b));
}

// The backward's extra tensors: dout like u, dlast_state (batch, dim, N) and
// the forward's chunk_states (batch, dim, ceil(L / chunk), N).
inline void check_backward(const char* op, Backend be, const ScanSizes& s, int64_t chunk, const Tensor& dout,
                           const std::optional<Tensor>& dlast_state, const Tensor& chunk_states, const Tensor& u) {
  check_like_u(op, be, "dout", dout, s, u, "u");
  if (dlast_state.has_value())
    check_acc(op, be, "dlast_state", *dlast_state, s, {s.batch, s.dim, s.N}, "(batch, dim, N)", u, "u");
  const int64_t nchunks = ceil_div(s.L, chunk);
  check_acc(op, be, "chunk_states", chunk_states, s, {s.batch, s.dim, nchunks, s.N},
            "(batch, dim, ceil(L / chunk_len), N), the forward's for the same chunk_len", u, "u");
}

}  // namespace fastvision::scan
