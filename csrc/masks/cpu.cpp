// CPU kernels of the mask codecs: COCO RLE (pycocotools' format, counts in
// int64 so that masks of 2^31 pixels and more work) and Text4Seg's R-RLE.
//
// COCO RLE: the counts of a mask read column-major (Fortran order) are
// alternating runs starting with zeros. A batch of N RLEs travels as three
// tensors: counts (all masks' counts, concatenated; int64), offsets (N + 1;
// mask i owns counts[offsets[i]:offsets[i+1]]) and sizes (N, 2) = (h, w) per
// mask. Every entry point validates a batch completely before reading it
// (offsets in range and non-decreasing, counts non-negative and summing to
// h * w per mask), so malformed RLEs raise ValueError instead of reading or
// writing out of bounds. The algorithms follow pycocotools' maskApi.c (its
// 2.0.11 toBbox); its merge and iou loops are the same state machines here,
// so results are byte-identical on every valid RLE. IoU works per column
// (see Columns below): the intersection of two masks is a vectorised sum over
// the columns both boxes share.
//
// R-RLE (Text4Seg's "semantic descriptors"): an h x w grid of labels written
// "{label}{count_sep}{count}" joined by run_sep within a row, rows joined by
// row_sep, ended by `end`. The decoder parses strictly (any deviation is a
// ValueError naming the row and column) or tolerantly (repairs what models
// emit and lists the repairs it made).
//
// Work is parallel over masks (fastvision::parallel_for). pyapi.h (included
// at the end) calls the same cores from plain CPython functions, for the
// Python objects fastvision.masks is given (pycocotools dicts, str, a small
// tensor), where a torch op's call would cost more than the work.

#include <Python.h>  // (first, as CPython asks) for pyapi.h
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "../common/alloc.h"
#include "../common/check.h"
#include "../common/common.h"
#include "../common/parallel.h"

namespace fastvision::masks {

using Counts = std::vector<int64_t>;

// ---------------------------------------------------------------------------
// Argument checks

inline void check_host_1d(const char* op, const std::string& name, const Tensor& t, ScalarType dtype,
                          const std::string& doc) {
  check_cpu(op, name, t);
  check_dtype_is(op, name, t, dtype, doc);
  check_rank(op, name, t, 1, doc);
  check_contiguous(op, name, t);
}

// A validated batch of RLEs (pointers into the checked tensors).
struct RleBatch {
  const int64_t* counts = nullptr;
  const int64_t* offsets = nullptr;
  const int64_t* sizes = nullptr;
  int64_t n = 0;
  int64_t begin(int64_t i) const { return offsets[i]; }
  int64_t len(int64_t i) const { return offsets[i + 1] - offsets[i]; }
  const int64_t* cnts(int64_t i) const { return counts + offsets[i]; }
  int64_t h(int64_t i) const { return sizes[2 * i]; }
  int64_t w(int64_t i) const { return sizes[2 * i + 1]; }
};

// Checks n (h, w) pairs: h, w >= 0 and h * w without overflow.
inline void check_size_values(const char* op, const std::string& name, const int64_t* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t area = 0;
    FV_CHECK(s[2 * i] >= 0 && s[2 * i + 1] >= 0, op, name, "[", i, "] = (", s[2 * i], ", ", s[2 * i + 1],
             ") must be non-negative");
    FV_CHECK(mul_fits(s[2 * i], s[2 * i + 1], &area), op, name, "[", i, "] = (", s[2 * i], ", ", s[2 * i + 1],
             "): h * w overflows int64");
  }
}

// Checks sizes (n, 2): h, w >= 0 and h * w without overflow.
inline const int64_t* check_sizes(const char* op, const std::string& name, const Tensor& sizes, int64_t n) {
  check_cpu(op, name, sizes);
  check_dtype_is(op, name, sizes, ScalarType::Long, "(h, w) per mask");
  check_contiguous(op, name, sizes);
  FV_CHECK(sizes.dim() == 2 && sizes.size(1) == 2 && (n < 0 || sizes.size(0) == n), op, name,
           " must have shape (N, 2) = (h, w) per mask", n >= 0 ? " with N = " + std::to_string(n) : "",
           "; got shape ", shape_str(sizes));
  const int64_t* s = static_cast<const int64_t*>(sizes.const_data_ptr());
  check_size_values(op, name, s, sizes.size(0));
  return s;
}

// Checks offsets (n + 1) against a flat array of `total` entries.
inline const int64_t* check_offsets(const char* op, const std::string& name, const Tensor& offsets, int64_t total,
                                    const std::string& what) {
  check_host_1d(op, name, offsets, ScalarType::Long, "(N + 1,): where each item starts in " + what);
  FV_CHECK(offsets.size(0) >= 1, op, name, " must have N + 1 >= 1 entries; got none");
  const int64_t* o = static_cast<const int64_t*>(offsets.const_data_ptr());
  const int64_t n = offsets.size(0) - 1;
  FV_CHECK(o[0] == 0, op, name, "[0] must be 0; got ", o[0]);
  for (int64_t i = 0; i < n; ++i)
    FV_CHECK(o[i + 1] >= o[i], op, name, " must be non-decreasing; got ", name, "[", i, "] = ", o[i], " > ", name,
             "[", i + 1, "] = ", o[i + 1]);
  FV_CHECK(o[n] == total, op, name, "[N] must be the length of ", what, " (", total, "); got ", o[n]);
  return o;
}

// Checks a whole RLE batch: every mask's counts are non-negative and sum to h * w.
inline RleBatch check_rles(const char* op, const std::string& prefix, const Tensor& counts, const Tensor& offsets,
                           const Tensor& sizes) {
  check_host_1d(op, prefix + "counts", counts, ScalarType::Long, "(total counts,): every RLE's counts, concatenated");
  RleBatch b;
  b.counts = static_cast<const int64_t*>(counts.const_data_ptr());
  b.offsets = check_offsets(op, prefix + "offsets", offsets, counts.size(0), prefix + "counts");
  b.n = offsets.size(0) - 1;
  b.sizes = check_sizes(op, prefix + "sizes", sizes, b.n);
  for (int64_t i = 0; i < b.n; ++i) {
    const int64_t area = b.h(i) * b.w(i);
    int64_t sum = 0;
    const int64_t* c = b.cnts(i);
    for (int64_t j = 0; j < b.len(i); ++j) {
      FV_CHECK(c[j] >= 0, op, "RLE ", i, ": count ", j, " is negative (", c[j], ")");
      FV_CHECK(c[j] <= area - sum, op, "RLE ", i, ": counts sum to more than h * w = ", b.h(i), " * ", b.w(i),
               " = ", area, " (at count ", j, ")");
      sum += c[j];
    }
    FV_CHECK(sum == area, op, "RLE ", i, ": counts sum to ", sum, ", not h * w = ", b.h(i), " * ", b.w(i), " = ",
             area);
  }
  return b;
}

// counts and offsets tensors from per-item vectors.
template <typename T>
std::tuple<Tensor, Tensor> concat(const char* op, const std::string& what, const std::vector<std::vector<T>>& items,
                                  const Tensor& like, ScalarType dtype) {
  const int64_t n = static_cast<int64_t>(items.size());
  Tensor offsets = alloc_empty(op, what + " offsets", like, {n + 1}, ScalarType::Long);
  int64_t* o = static_cast<int64_t*>(offsets.mutable_data_ptr());
  o[0] = 0;
  for (int64_t i = 0; i < n; ++i) o[i + 1] = o[i] + static_cast<int64_t>(items[i].size());
  Tensor flat = alloc_empty(op, what, like, {o[n]}, dtype);
  T* f = static_cast<T*>(flat.mutable_data_ptr());
  parallel_for(op, 0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (!items[i].empty()) std::memcpy(f + o[i], items[i].data(), items[i].size() * sizeof(T));
  });
  return {flat, offsets};
}

// ---------------------------------------------------------------------------
// Encode

// The first index >= i (< L) whose byte is nonzero, or L.
inline int64_t find_nonzero(const uint8_t* p, int64_t i, int64_t L) {
  for (; i + 32 <= L; i += 32) {
    uint64_t v[4];
    std::memcpy(v, p + i, 32);
    if (v[0] | v[1] | v[2] | v[3]) break;
  }
  for (; i + 8 <= L; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    if (v) break;
  }
  while (i < L && !p[i]) ++i;
  return i;
}

// The first index >= i (< L) whose byte is zero, or L.
inline int64_t find_zero(const uint8_t* p, int64_t i, int64_t L) {
  const void* z = i < L ? std::memchr(p + i, 0, static_cast<size_t>(L - i)) : nullptr;
  return z ? static_cast<const uint8_t*>(z) - p : L;
}

// Counts of L bytes read in order (nonzero = foreground).
void encode_linear(const uint8_t* p, int64_t L, Counts& out) {
  out.clear();
  int64_t start = 0;
  bool fg = false;
  for (;;) {
    const int64_t j = fg ? find_zero(p, start, L) : find_nonzero(p, start, L);
    out.push_back(j - start);
    if (j >= L) break;
    start = j;
    fg = !fg;
  }
}

// Counts of an (H, W) row-major mask read column-major, without transposing
// it: the value changes (y, x) are found row against row (word compares
// skip equal stretches), then sorted by column with a counting sort (stable:
// rows stay in order), which is column-major order.
void encode_rowmajor(const uint8_t* m, int64_t H, int64_t W, Counts& out, std::vector<int64_t>& ev_x,
                     std::vector<int64_t>& ev_y, std::vector<int64_t>& col) {
  ev_x.clear();
  ev_y.clear();
  auto add = [&](int64_t x, int64_t y) { ev_x.push_back(x); ev_y.push_back(y); };
  if (H > 0 && W > 0) {
    // Row 0: each column's first pixel against the previous column's last.
    const uint8_t* last = m + (H - 1) * W;
    for (int64_t x = 0; x < W; ++x) {
      const bool prev = x > 0 && last[x - 1] != 0;
      if ((m[x] != 0) != prev) add(x, 0);
    }
    for (int64_t y = 1; y < H; ++y) {
      const uint8_t* a = m + (y - 1) * W;
      const uint8_t* b = m + y * W;
      int64_t x = 0;
      while (x < W) {
        if (x + 8 <= W) {
          uint64_t u, v;
          std::memcpy(&u, a + x, 8);
          std::memcpy(&v, b + x, 8);
          if (u == v) { x += 8; continue; }
          for (int64_t e = x + 8; x < e; ++x)
            if ((a[x] != 0) != (b[x] != 0)) add(x, y);
        } else {
          if ((a[x] != 0) != (b[x] != 0)) add(x, y);
          ++x;
        }
      }
    }
  }
  const int64_t E = static_cast<int64_t>(ev_x.size());
  col.assign(static_cast<size_t>(W + 1), 0);
  for (int64_t e = 0; e < E; ++e) ++col[ev_x[e] + 1];
  for (int64_t x = 0; x < W; ++x) col[x + 1] += col[x];
  std::vector<int64_t>& pos = ev_x;  // reused: positions x * H + y in column-major order
  std::vector<int64_t> sorted(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) sorted[col[ev_x[e]]++] = ev_x[e] * H + ev_y[e];
  pos.swap(sorted);
  out.clear();
  int64_t prev = 0;
  for (int64_t e = 0; e < E; ++e) {
    out.push_back(pos[e] - prev);
    prev = pos[e];
  }
  out.push_back(H * W - prev);
}

// masks (N, H, W) uint8/bool, row-major (contiguous) or column-major (strides
// (H*W, 1, H), as a Fortran (H, W, N) array seen through permute(2, 0, 1)).
std::tuple<Tensor, Tensor> rle_encode_cpu(Tensor masks) {
  const char* op = "rle_encode";
  check_cpu(op, "masks", masks);
  FV_CHECK(masks.scalar_type() == ScalarType::Byte || masks.scalar_type() == ScalarType::Bool, op,
           "masks must be uint8 or bool (nonzero = foreground); got ", dtype_name(masks.scalar_type()));
  check_rank(op, "masks", masks, 3, "(N, H, W)");
  const int64_t N = masks.size(0), H = masks.size(1), W = masks.size(2);
  auto fits = [](const Tensor& t, int64_t d, int64_t s) { return t.size(d) <= 1 || t.stride(d) == s; };
  const bool colmajor = !masks.is_contiguous() && fits(masks, 1, 1) && fits(masks, 2, H) && fits(masks, 0, H * W);
  FV_CHECK(masks.is_contiguous() || colmajor, op,
           "masks must be contiguous (row-major) or column-major (strides (H*W, 1, H)); got strides ",
           strides_str(masks), " for shape ", shape_str(masks), " (call .contiguous())");
  const uint8_t* data = static_cast<const uint8_t*>(masks.const_data_ptr());
  std::vector<Counts> out(static_cast<size_t>(N));
  parallel_for(op, 0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<int64_t> ev_x, ev_y, col;
    for (int64_t i = b; i < e; ++i) {
      const uint8_t* m = data + i * H * W;
      if (colmajor || H == 1 || W == 1)
        encode_linear(m, H * W, out[i]);
      else
        encode_rowmajor(m, H, W, out[i], ev_x, ev_y, col);
    }
  });
  return concat(op, "counts", out, masks, ScalarType::Long);
}

// ---------------------------------------------------------------------------
// Decode

// (N, W, H) when column_major (a Fortran (H, W, N) array's memory), else (N, H, W); uint8 0/1.
Tensor rle_decode_cpu(Tensor counts, Tensor offsets, Tensor sizes, bool column_major) {
  const char* op = "rle_decode";
  const RleBatch b = check_rles(op, "", counts, offsets, sizes);
  int64_t H = 0, W = 0;
  if (b.n > 0) {
    H = b.h(0);
    W = b.w(0);
  }
  for (int64_t i = 1; i < b.n; ++i)
    FV_CHECK(b.h(i) == H && b.w(i) == W, op, "every RLE of a batch must have one size: RLE 0 is ", H, " x ", W,
             ", RLE ", i, " is ", b.h(i), " x ", b.w(i));
  Tensor out = alloc_empty(op, "masks", counts, column_major ? std::vector<int64_t>{b.n, W, H}
                                                            : std::vector<int64_t>{b.n, H, W},
                           ScalarType::Byte);
  if (b.n == 0 || H * W == 0) return out;  // nothing to write (and no buffer to write to)
  uint8_t* o = static_cast<uint8_t*>(out.mutable_data_ptr());
  parallel_for(op, 0, b.n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      uint8_t* m = o + i * H * W;
      const int64_t* c = b.cnts(i);
      if (column_major) {
        int64_t p = 0;
        for (int64_t j = 0; j < b.len(i); ++j) {
          std::memset(m + p, j & 1, static_cast<size_t>(c[j]));
          p += c[j];
        }
        continue;
      }
      std::memset(m, 0, static_cast<size_t>(H * W));
      int64_t p = 0;
      for (int64_t j = 0; j < b.len(i); ++j) {
        if (j & 1) {  // a foreground run: column by column
          int64_t q = p, left = c[j];
          while (left > 0) {
            const int64_t x = q / H, y = q % H, n = std::min(left, H - y);
            for (int64_t k = 0; k < n; ++k) m[(y + k) * W + x] = 1;
            q += n;
            left -= n;
          }
        }
        p += c[j];
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// Compressed strings (pycocotools' rleToString / rleFrString)

void to_string(const int64_t* c, int64_t m, std::vector<uint8_t>& s) {
  s.clear();
  for (int64_t i = 0; i < m; ++i) {
    int64_t x = c[i];
    if (i > 2) x -= c[i - 2];
    bool more = true;
    while (more) {
      uint8_t ch = static_cast<uint8_t>(x & 0x1f);
      x >>= 5;  // arithmetic: the decoder sign-extends
      more = (ch & 0x10) ? x != -1 : x != 0;
      if (more) ch |= 0x20;
      s.push_back(static_cast<uint8_t>(ch + 48));
    }
  }
}

std::tuple<Tensor, Tensor> rle_to_string_cpu(Tensor counts, Tensor offsets, Tensor sizes) {
  const char* op = "rle_to_string";
  const RleBatch b = check_rles(op, "", counts, offsets, sizes);
  std::vector<std::vector<uint8_t>> out(static_cast<size_t>(b.n));
  parallel_for(op, 0, b.n, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) to_string(b.cnts(i), b.len(i), out[i]);
  });
  return concat(op, "chars", out, counts, ScalarType::Byte);
}

// At most 12 characters of 5 bits per count: 60 bits, far above any h * w.
constexpr int kMaxChunks = 12;

// Parses string i (s[0:L]) of size h x w into `out`; throws ValueError naming the problem.
void from_string(const char* op, int64_t i, const uint8_t* s, int64_t L, int64_t h, int64_t w, Counts& out) {
  out.clear();
  const int64_t area = h * w;
  int64_t p = 0, sum = 0;
  while (p < L) {
    uint64_t x = 0;
    int k = 0;
    bool more = true;
    const int64_t start = p;
    while (more) {
      FV_CHECK(p < L, op, "string ", i, " is truncated: it ends inside a count (at character ", L, ")");
      const int c = static_cast<int>(s[p]) - 48;
      FV_CHECK(c >= 0 && c < 64, op, "string ", i, ": character ", p, " (byte ", static_cast<int>(s[p]),
               ") is not a count character ('0'..'o')");
      FV_CHECK(k < kMaxChunks, op, "string ", i, ": the count starting at character ", start,
               " overflows (more than ", kMaxChunks, " characters)");
      x |= static_cast<uint64_t>(c & 0x1f) << (5 * k);
      more = c & 0x20;
      ++p;
      ++k;
      if (!more && (c & 0x10)) x |= ~uint64_t(0) << (5 * k);  // sign-extend
    }
    int64_t v = static_cast<int64_t>(x);
    const int64_t m = static_cast<int64_t>(out.size());
    if (m > 2) {
      FV_CHECK(!__builtin_add_overflow(v, out[m - 2], &v), op, "string ", i, ": count ", m, " overflows");
    }
    FV_CHECK(v >= 0, op, "string ", i, ": count ", m, " is negative (", v, ")");
    FV_CHECK(v <= area - sum, op, "string ", i, ": counts sum to more than h * w = ", h, " * ", w, " = ", area,
             " (at count ", m, ")");
    sum += v;
    out.push_back(v);
  }
  FV_CHECK(sum == area, op, "string ", i, ": counts sum to ", sum, ", not h * w = ", h, " * ", w, " = ", area);
}

std::tuple<Tensor, Tensor> rle_from_string_cpu(Tensor chars, Tensor char_offsets, Tensor sizes) {
  const char* op = "rle_from_string";
  check_host_1d(op, "chars", chars, ScalarType::Byte, "(total characters,): every string, concatenated");
  const int64_t* o = check_offsets(op, "char_offsets", char_offsets, chars.size(0), "chars");
  const int64_t n = char_offsets.size(0) - 1;
  const int64_t* sz = check_sizes(op, "sizes", sizes, n);
  const uint8_t* s = static_cast<const uint8_t*>(chars.const_data_ptr());
  std::vector<Counts> out(static_cast<size_t>(n));
  parallel_for(op, 0, n, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) from_string(op, i, s + o[i], o[i + 1] - o[i], sz[2 * i], sz[2 * i + 1], out[i]);
  });
  return concat(op, "counts", out, chars, ScalarType::Long);
}

// ---------------------------------------------------------------------------
// Area, bounding boxes, IoU, merge

Tensor rle_area_cpu(Tensor counts, Tensor offsets, Tensor sizes) {
  const char* op = "rle_area";
  const RleBatch b = check_rles(op, "", counts, offsets, sizes);
  Tensor out = alloc_empty(op, "area", counts, {b.n}, ScalarType::Long);
  int64_t* a = static_cast<int64_t*>(out.mutable_data_ptr());
  for (int64_t i = 0; i < b.n; ++i) {
    int64_t s = 0;
    for (int64_t j = 1; j < b.len(i); j += 2) s += b.cnts(i)[j];
    a[i] = s;
  }
  return out;
}

// [x, y, w, h] of mask i's foreground (pycocotools 2.0.11's rleToBbox: whole
// foreground runs; a run crossing columns spans every row). No foreground: zeros.
void bbox_of(const RleBatch& b, int64_t i, double* bb) {
  const int64_t h = b.h(i), w = b.w(i), m = (b.len(i) / 2) * 2;
  const int64_t* c = b.cnts(i);
  int64_t xs = w, ys = h, xe = 0, ye = 0, cc = 0;
  bool any = false;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t start = cc;
    cc += c[j];
    if (j % 2 == 0 || c[j] == 0) continue;
    any = true;
    const int64_t x0 = start / h, y0 = start % h, x1 = (cc - 1) / h, y1 = (cc - 1) % h;
    xs = std::min(xs, x0);
    xe = std::max(xe, x1);
    if (x0 < x1) {
      ys = 0;
      ye = h - 1;
    } else {
      ys = std::min(ys, y0);
      ye = std::max(ye, y1);
    }
  }
  if (!any) {
    bb[0] = bb[1] = bb[2] = bb[3] = 0;
    return;
  }
  bb[0] = static_cast<double>(xs);
  bb[1] = static_cast<double>(ys);
  bb[2] = static_cast<double>(xe - xs + 1);
  bb[3] = static_cast<double>(ye - ys + 1);
}

Tensor rle_to_bbox_cpu(Tensor counts, Tensor offsets, Tensor sizes) {
  const char* op = "rle_to_bbox";
  const RleBatch b = check_rles(op, "", counts, offsets, sizes);
  Tensor out = alloc_empty(op, "boxes", counts, {b.n, 4}, ScalarType::Double);
  double* bb = static_cast<double*>(out.mutable_data_ptr());
  for (int64_t i = 0; i < b.n; ++i) bbox_of(b, i, bb + 4 * i);
  return out;
}

// IoU of boxes (pycocotools' bbIou): crowd divides by the detection's area.
inline double box_iou(const double* D, const double* G, bool crowd) {
  // (std::min / max, not fmin / fmax: no library call; boxes hold no NaN)
  const double w = std::min(D[2] + D[0], G[2] + G[0]) - std::max(D[0], G[0]);
  if (w <= 0) return 0;
  const double h = std::min(D[3] + D[1], G[3] + G[1]) - std::max(D[1], G[1]);
  if (h <= 0) return 0;
  const double i = w * h, da = D[2] * D[3], ga = G[2] * G[3];
  return i / (crowd ? da : da + ga - i);
}

// IoU works on each mask's foreground column by column: columns [x0, x1)
// (its box's), and in each column the foreground rows [s, e) when the column
// holds at most one run (s = e = 0 when it holds none). Masks are mostly such
// columns (instance masks: one run per column), so a pair's intersection is
// a branch-free, vectorised sum over the columns both boxes share; columns
// holding several runs are listed apart and intersected exactly afterwards.
// union = area_a + area_b - intersection: the integers pycocotools' run-by-run
// loop counts, so the IoUs are its bits.
struct Columns {
  int64_t x0 = 0, x1 = 0, area = 0;
  std::vector<int32_t> s, e;              // per column of [x0, x1); 0, 0 where several runs
  std::vector<int64_t> multi_x;           // the columns holding several runs, ascending
  std::vector<int64_t> multi_off;         // column multi_x[k]'s runs: [multi_off[k], multi_off[k + 1])
  std::vector<int32_t> ms, me;            // of ms / me (rows)
};

// Rows must fit int32; beyond that (or for boxes too wide to hold per column)
// IoU walks the foreground intervals of the whole mask instead.
constexpr int64_t kMaxColumnRows = INT32_MAX;
constexpr int64_t kMaxColumnsPerCall = int64_t(1) << 24;

// Columns of mask `c` (`len` counts summing to h * w) and its box, [x, y, w, h]
// as bbox_of's (a run crossing columns covers rows h - 1 and 0 of the columns
// it spans, so the rows' min and max are the same). No divisions on the way
// (they would cost more than the walk): the position advances run by run.
inline void columns_of(const int64_t* c, int64_t len, int64_t h, Columns& col, double* bb) {
  col = Columns();
  // The foreground's first and last pixels: [first, end).
  int64_t first = -1, end = 0;
  for (int64_t j = 0, p = 0; j < len; p += c[j], ++j) {
    if (!(j & 1) || c[j] == 0) continue;
    if (first < 0) first = p;
    end = p + c[j];
  }
  if (first < 0) {  // no foreground (also h == 0)
    bb[0] = bb[1] = bb[2] = bb[3] = 0;
    return;
  }
  col.x0 = first / h;
  col.x1 = (end - 1) / h + 1;
  col.s.assign(static_cast<size_t>(col.x1 - col.x0), 0);
  col.e.assign(col.s.size(), 0);
  int64_t x = 0, y = 0, last = -1, ys = h, ye = 0;  // (x, y): where count j starts
  for (int64_t j = 0; j < len; ++j) {
    int64_t left = c[j];
    if (!(j & 1)) {
      y += left;
      if (y >= h) {
        if (y < 2 * h) {
          y -= h;
          ++x;
        } else {
          x += y / h;
          y %= h;
        }
      }
      continue;
    }
    col.area += left;
    while (left > 0) {  // the run, cut at column ends
      const int64_t n = std::min(left, h - y);
      const size_t k = static_cast<size_t>(x - col.x0);
      ys = std::min(ys, y);
      ye = std::max(ye, y + n);
      if (x != last) {
        col.s[k] = static_cast<int32_t>(y);
        col.e[k] = static_cast<int32_t>(y + n);
      } else {  // a second (third, ...) run in this column: listed apart
        if (col.multi_x.empty() || col.multi_x.back() != x) {
          col.multi_x.push_back(x);
          col.multi_off.push_back(static_cast<int64_t>(col.ms.size()));
          col.ms.push_back(col.s[k]);
          col.me.push_back(col.e[k]);
          col.s[k] = col.e[k] = 0;
        }
        col.ms.push_back(static_cast<int32_t>(y));
        col.me.push_back(static_cast<int32_t>(y + n));
      }
      last = x;
      left -= n;
      y += n;
      if (y == h) {
        y = 0;
        ++x;
      }
    }
  }
  col.multi_off.push_back(static_cast<int64_t>(col.ms.size()));
  bb[0] = static_cast<double>(col.x0);
  bb[1] = static_cast<double>(ys);
  bb[2] = static_cast<double>(col.x1 - col.x0);
  bb[3] = static_cast<double>(ye - ys);
}

// Foreground pixels both masks have in the columns [x0, x1) they share, outside
// the columns holding several runs (their rows are 0, 0 there).
FV_CPU_CLONES int64_t single_run_overlap(const int32_t* as, const int32_t* ae, const int32_t* bs,
                                         const int32_t* be, int64_t n) {
  int64_t in = 0;
#pragma omp simd reduction(+ : in)
  for (int64_t k = 0; k < n; ++k) {
    const int32_t d = std::min(ae[k], be[k]) - std::max(as[k], bs[k]);
    in += d > 0 ? d : 0;
  }
  return in;
}

// Rows [s, e) of column x of a mask: its runs there (one or several), as a range of (s, e) arrays.
struct ColumnRuns {
  const int32_t *s, *e;
  int64_t n;
};

inline ColumnRuns runs_at(const Columns& c, int64_t x, size_t& k) {
  while (k < c.multi_x.size() && c.multi_x[k] < x) ++k;
  if (k < c.multi_x.size() && c.multi_x[k] == x)
    return {c.ms.data() + c.multi_off[k], c.me.data() + c.multi_off[k], c.multi_off[k + 1] - c.multi_off[k]};
  if (x < c.x0 || x >= c.x1) return {nullptr, nullptr, 0};
  const size_t i = static_cast<size_t>(x - c.x0);
  return {c.s.data() + i, c.e.data() + i, c.s[i] < c.e[i] ? 1 : 0};
}

// Intersection of A and B in [x0, x1): the single-run columns, then every column where either holds several runs.
inline int64_t intersection(const Columns& A, const Columns& B, int64_t x0, int64_t x1) {
  if (x1 <= x0) return 0;
  int64_t in = single_run_overlap(A.s.data() + (x0 - A.x0), A.e.data() + (x0 - A.x0), B.s.data() + (x0 - B.x0),
                                  B.e.data() + (x0 - B.x0), x1 - x0);
  if (A.multi_x.empty() && B.multi_x.empty()) return in;
  size_t ia = std::lower_bound(A.multi_x.begin(), A.multi_x.end(), x0) - A.multi_x.begin();
  size_t ib = std::lower_bound(B.multi_x.begin(), B.multi_x.end(), x0) - B.multi_x.begin();
  for (;;) {
    const int64_t xa = ia < A.multi_x.size() ? A.multi_x[ia] : x1, xb = ib < B.multi_x.size() ? B.multi_x[ib] : x1;
    const int64_t x = std::min(xa, xb);
    if (x >= x1) return in;
    const ColumnRuns a = runs_at(A, x, ia), b = runs_at(B, x, ib);
    for (int64_t i = 0, j = 0; i < a.n && j < b.n;) {  // both sorted: a merge
      const int64_t lo = std::max(a.s[i], b.s[j]), hi = std::min(a.e[i], b.e[j]);
      if (hi > lo) in += hi - lo;
      if (a.e[i] < b.e[j]) ++i;
      else ++j;
    }
    ia += xa == x;
    ib += xb == x;
  }
}

// The fallback: a mask's foreground as sorted intervals [start, end) of
// column-major positions; IoU walks those inside the columns both boxes share.
struct Intervals {
  std::vector<int64_t> start, end;
  int64_t area = 0;
};

inline Intervals intervals_of(const RleBatch& b, int64_t i) {
  Intervals iv;
  int64_t p = 0;
  const int64_t* c = b.cnts(i);
  for (int64_t j = 0; j < b.len(i); ++j) {
    if ((j & 1) && c[j] > 0) {
      iv.start.push_back(p);
      iv.end.push_back(p + c[j]);
      iv.area += c[j];
    }
    p += c[j];
  }
  return iv;
}

// Pixels of A and B both in [lo, hi).
inline int64_t intersection(const Intervals& A, const Intervals& B, int64_t lo, int64_t hi) {
  size_t a = std::upper_bound(A.end.begin(), A.end.end(), lo) - A.end.begin();
  size_t b = std::upper_bound(B.end.begin(), B.end.end(), lo) - B.end.begin();
  int64_t inter = 0;
  while (a < A.start.size() && b < B.start.size() && A.start[a] < hi && B.start[b] < hi) {
    const int64_t s = std::max(A.start[a], B.start[b]), e = std::min(A.end[a], B.end[b]);
    if (e > s) inter += e - s;
    if (A.end[a] < B.end[b]) ++a;
    else ++b;
  }
  return inter;
}

// Whether a batch's masks fit the column form (rows in int32, boxes' columns held).
inline bool fits_columns(const RleBatch& b, int64_t& columns) {
  for (int64_t i = 0; i < b.n; ++i) {
    if (b.h(i) > kMaxColumnRows || b.w(i) > kMaxColumnsPerCall - columns) return false;
    columns += b.w(i);
  }
  return true;
}

// The IoU kernel of rle_iou and of the Python fast path (pyapi.h): d and g
// checked (counts sum to h * w), every d of the size of every g; out (D, G).
void iou_into(const char* op, const RleBatch& d, const RleBatch& g, const uint8_t* crowd, double* o) {
  std::vector<double> dbb(static_cast<size_t>(4 * d.n)), gbb(static_cast<size_t>(4 * g.n));
  int64_t columns = 0;
  const bool by_columns = fits_columns(d, columns) && fits_columns(g, columns);
  std::vector<Columns> dc(by_columns ? d.n : 0), gc(by_columns ? g.n : 0);
  std::vector<Intervals> di(by_columns ? 0 : d.n), gi(by_columns ? 0 : g.n);
  parallel_for(op, 0, d.n + g.n, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const bool is_d = k < d.n;
      const RleBatch& b = is_d ? d : g;
      const int64_t i = is_d ? k : k - d.n;
      double* bb = (is_d ? dbb : gbb).data() + 4 * i;
      if (by_columns) {
        columns_of(b.cnts(i), b.len(i), b.h(i), (is_d ? dc : gc)[i], bb);
      } else {
        bbox_of(b, i, bb);
        (is_d ? di : gi)[i] = intervals_of(b, i);
      }
    }
  });
  parallel_for(op, 0, d.n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      for (int64_t j = 0; j < g.n; ++j) {
        double& r = o[i * g.n + j];
        // Boxes that do not overlap: masks that do not intersect (pycocotools' shortcut).
        const double* D = dbb.data() + 4 * i;
        const double* G = gbb.data() + 4 * j;
        r = box_iou(D, G, crowd[j] != 0);
        if (r <= 0) continue;
        // The columns both boxes cover (boxes hold whole pixels: exact in double).
        const int64_t x0 = static_cast<int64_t>(std::max(D[0], G[0]));
        const int64_t x1 = static_cast<int64_t>(std::min(D[0] + D[2], G[0] + G[2]));
        int64_t in, da, ga;
        if (by_columns) {
          in = intersection(dc[i], gc[j], x0, x1);
          da = dc[i].area;
          ga = gc[j].area;
        } else {
          in = intersection(di[i], gi[j], x0 * d.h(i), x1 * d.h(i));
          da = di[i].area;
          ga = gi[j].area;
        }
        const int64_t un = in == 0 ? 1 : crowd[j] ? da : da + ga - in;
        r = static_cast<double>(in) / static_cast<double>(un);
      }
    }
  });
}

// Every detection and ground truth of one size (IoU needs masks of one size).
inline void check_one_size(const char* op, const RleBatch& d, const RleBatch& g) {
  for (int64_t i = 0; i < d.n; ++i)
    for (int64_t j = 0; j < g.n; ++j)
      FV_CHECK(d.h(i) == g.h(j) && d.w(i) == g.w(j), op, "detection ", i, " is ", d.h(i), " x ", d.w(i),
               " but ground truth ", j, " is ", g.h(j), " x ", g.w(j), ": IoU needs masks of one size");
}

// (D, G) float64: IoU of every detection with every ground truth, in the RLE
// domain; iscrowd (G,) bool/uint8: a crowd ground truth divides by the detection's area.
Tensor rle_iou_cpu(Tensor dt_counts, Tensor dt_offsets, Tensor dt_sizes, Tensor gt_counts, Tensor gt_offsets,
                   Tensor gt_sizes, Tensor iscrowd) {
  const char* op = "rle_iou";
  const RleBatch d = check_rles(op, "dt_", dt_counts, dt_offsets, dt_sizes);
  const RleBatch g = check_rles(op, "gt_", gt_counts, gt_offsets, gt_sizes);
  check_cpu(op, "iscrowd", iscrowd);
  FV_CHECK(iscrowd.scalar_type() == ScalarType::Bool || iscrowd.scalar_type() == ScalarType::Byte, op,
           "iscrowd must be bool or uint8; got ", dtype_name(iscrowd.scalar_type()));
  FV_CHECK(iscrowd.dim() == 1 && iscrowd.size(0) == g.n, op, "iscrowd must have shape (G,) = (", g.n,
           ",), one flag per ground truth; got shape ", shape_str(iscrowd));
  check_contiguous(op, "iscrowd", iscrowd);
  check_one_size(op, d, g);
  Tensor out = alloc_empty(op, "iou", dt_counts, {d.n, g.n}, ScalarType::Double);
  iou_into(op, d, g, static_cast<const uint8_t*>(iscrowd.const_data_ptr()),
           static_cast<double*>(out.mutable_data_ptr()));
  return out;
}
// Union (or intersection) of the batch's N RLEs of one size: pycocotools'
// rleMerge, pair by pair, so the counts are byte-identical to its.
Tensor rle_merge_cpu(Tensor counts, Tensor offsets, Tensor sizes, bool intersect) {
  const char* op = "rle_merge";
  const RleBatch b = check_rles(op, "", counts, offsets, sizes);
  for (int64_t i = 1; i < b.n; ++i)
    FV_CHECK(b.h(i) == b.h(0) && b.w(i) == b.w(0), op, "every RLE must have one size: RLE 0 is ", b.h(0), " x ",
             b.w(0), ", RLE ", i, " is ", b.h(i), " x ", b.w(i));
  Counts acc, next;
  if (b.n > 0) acc.assign(b.cnts(0), b.cnts(0) + b.len(0));
  for (int64_t r = 1; r < b.n; ++r) {
    const int64_t* A = acc.data();
    const int64_t ka = static_cast<int64_t>(acc.size());
    const int64_t* B = b.cnts(r);
    const int64_t kb = b.len(r);
    next.clear();
    int64_t ca = ka ? A[0] : 0, cb = kb ? B[0] : 0, a = 1, bi = 1, cc = 0, ct = 1;
    bool v = false, va = false, vb = false;
    while (ct > 0) {
      const int64_t c = std::min(ca, cb);
      cc += c;
      ct = 0;
      ca -= c;
      if (!ca && a < ka) { ca = A[a++]; va = !va; }
      ct += ca;
      cb -= c;
      if (!cb && bi < kb) { cb = B[bi++]; vb = !vb; }
      ct += cb;
      const bool vp = v;
      v = intersect ? (va && vb) : (va || vb);
      if (v != vp || ct == 0) {
        next.push_back(cc);
        cc = 0;
      }
    }
    acc.swap(next);
  }
  Tensor out = alloc_empty(op, "counts", counts, {static_cast<int64_t>(acc.size())}, ScalarType::Long);
  if (!acc.empty()) std::memcpy(out.mutable_data_ptr(), acc.data(), acc.size() * sizeof(int64_t));
  return out;
}

// ---------------------------------------------------------------------------
// Polygons (pycocotools' rleFrPoly)

// Coordinates beyond this are refused: the boundary is sampled 5 points per
// pixel, so larger ones would take gigabytes (and overflow pycocotools' ints).
constexpr double kMaxCoord = 1e7;

void from_polygon(const char* op, int64_t pi, const double* xy, int64_t k, int64_t h, int64_t w, Counts& out) {
  const double scale = 5;
  for (int64_t j = 0; j < 2 * k; ++j)
    FV_CHECK(std::isfinite(xy[j]) && std::fabs(xy[j]) <= kMaxCoord, op, "polygon ", pi, ": coordinate ", j, " (",
             xy[j], ") must be finite and within +-", kMaxCoord);
  std::vector<int64_t> x(static_cast<size_t>(k + 1)), y(static_cast<size_t>(k + 1));
  for (int64_t j = 0; j < k; ++j) x[j] = static_cast<int64_t>(scale * xy[2 * j] + .5);  // truncation, as (int)
  for (int64_t j = 0; j < k; ++j) y[j] = static_cast<int64_t>(scale * xy[2 * j + 1] + .5);
  if (k > 0) {
    x[k] = x[0];
    y[k] = y[0];
  }
  int64_t m = 0;
  for (int64_t j = 0; j < k; ++j) m += std::max(std::llabs(x[j] - x[j + 1]), std::llabs(y[j] - y[j + 1])) + 1;
  std::vector<int64_t> u = host_vector<int64_t>(op, "polygon boundary", m), v = host_vector<int64_t>(op, "polygon boundary", m);
  m = 0;
  for (int64_t j = 0; j < k; ++j) {
    int64_t xs = x[j], xe = x[j + 1], ys = y[j], ye = y[j + 1];
    const int64_t dx = std::llabs(xe - xs), dy = std::llabs(ys - ye);
    const bool flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
    if (flip) {
      std::swap(xs, xe);
      std::swap(ys, ye);
    }
    // (A repeated vertex, dx = dy = 0, is 0/0 in pycocotools; its one point is never used.)
    const double s = dx == 0 && dy == 0 ? 0.0
                     : dx >= dy         ? static_cast<double>(ye - ys) / dx
                                        : static_cast<double>(xe - xs) / dy;
    if (dx >= dy) {
      for (int64_t d = 0; d <= dx; ++d) {
        const int64_t t = flip ? dx - d : d;
        u[m] = t + xs;
        v[m] = static_cast<int64_t>(ys + s * t + .5);
        ++m;
      }
    } else {
      for (int64_t d = 0; d <= dy; ++d) {
        const int64_t t = flip ? dy - d : d;
        v[m] = t + ys;
        u[m] = static_cast<int64_t>(xs + s * t + .5);
        ++m;
      }
    }
  }
  // Points on the y-boundary, downsampled.
  std::vector<int64_t> a;
  for (int64_t j = 1; j < m; ++j) {
    if (u[j] == u[j - 1]) continue;
    double xd = static_cast<double>(u[j] < u[j - 1] ? u[j] : u[j] - 1);
    xd = (xd + .5) / scale - .5;
    if (std::floor(xd) != xd || xd < 0 || xd > static_cast<double>(w) - 1) continue;
    double yd = static_cast<double>(v[j] < v[j - 1] ? v[j] : v[j - 1]);
    yd = (yd + .5) / scale - .5;
    if (yd < 0) yd = 0;
    else if (yd > static_cast<double>(h)) yd = static_cast<double>(h);
    yd = std::ceil(yd);
    a.push_back(static_cast<int64_t>(xd) * h + static_cast<int64_t>(yd));
  }
  a.push_back(h * w);
  std::sort(a.begin(), a.end());
  int64_t p = 0;
  for (auto& t : a) {
    const int64_t cur = t;
    t -= p;
    p = cur;
  }
  out.clear();
  size_t j = 0;
  out.push_back(a[j++]);
  while (j < a.size()) {
    if (a[j] > 0) {
      out.push_back(a[j++]);
    } else {
      ++j;
      if (j < a.size()) out.back() += a[j++];
    }
  }
}

// xy (total,) float64: every polygon's x0, y0, x1, y1, ... concatenated;
// poly_offsets (P + 1,) into xy. One RLE of h x w per polygon.
std::tuple<Tensor, Tensor> rle_from_polygons_cpu(Tensor xy, Tensor poly_offsets, int64_t h, int64_t w) {
  const char* op = "rle_from_polygons";
  check_host_1d(op, "xy", xy, ScalarType::Double, "(total,): every polygon's x0, y0, x1, y1, ..., concatenated");
  const int64_t* o = check_offsets(op, "poly_offsets", poly_offsets, xy.size(0), "xy");
  check_at_least(op, "h", h, 0);
  check_at_least(op, "w", w, 0);
  int64_t area = 0;
  FV_CHECK(mul_fits(h, w, &area), op, "h * w overflows int64: h = ", h, ", w = ", w);
  const int64_t n = poly_offsets.size(0) - 1;
  const double* p = static_cast<const double*>(xy.const_data_ptr());
  std::vector<Counts> out(static_cast<size_t>(n));
  parallel_for(op, 0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) from_polygon(op, i, p + o[i], (o[i + 1] - o[i]) / 2, h, w, out[i]);
  });
  return concat(op, "counts", out, xy, ScalarType::Long);
}

}  // namespace fastvision::masks

#include "rrle.h"
#include "pyapi.h"

STABLE_TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("rle_encode", TORCH_BOX(&fastvision::masks::rle_encode_cpu));
  m.impl("rle_decode", TORCH_BOX(&fastvision::masks::rle_decode_cpu));
  m.impl("rle_to_string", TORCH_BOX(&fastvision::masks::rle_to_string_cpu));
  m.impl("rle_from_string", TORCH_BOX(&fastvision::masks::rle_from_string_cpu));
  m.impl("rle_area", TORCH_BOX(&fastvision::masks::rle_area_cpu));
  m.impl("rle_to_bbox", TORCH_BOX(&fastvision::masks::rle_to_bbox_cpu));
  m.impl("rle_iou", TORCH_BOX(&fastvision::masks::rle_iou_cpu));
  m.impl("rle_merge", TORCH_BOX(&fastvision::masks::rle_merge_cpu));
  m.impl("rle_from_polygons", TORCH_BOX(&fastvision::masks::rle_from_polygons_cpu));
  m.impl("rrle_encode", TORCH_BOX(&fastvision::masks::rrle_encode_cpu));
  m.impl("rrle_decode", TORCH_BOX(&fastvision::masks::rrle_decode_cpu));
}
