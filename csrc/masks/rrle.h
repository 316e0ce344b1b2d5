// Text4Seg's R-RLE ("semantic descriptors", row-wise run-length encoding):
// the codec core. Included by csrc/masks/cpu.cpp (which registers it).
//
// Text: per row, runs "{label}{count_sep}{count}" joined by run_sep; rows
// joined by row_sep; the text ends with `end` (Text4Seg: "| ", "\n ", " *",
// "\n"). Forms: 0 row-wise runs (R-RLE), 1 image-wise runs (one sequence of
// runs over the raster-order grid, no row separators), 2 one label per patch
// (no counts); -1 (decode only) detects the form.
//
// GridEncoder writes a grid's text in one pass. decode_batch decodes texts
// into the ids of one label table (the known names first, then the other
// labels in order of first appearance; a text's own table is seeded with a
// few known names, so its ids need no mapping) and lists the repairs (text,
// kind, row, column, occurrences); the Python wrapper words the repairs and
// maps unknown labels to known names. A text written exactly (what encoders
// and most model outputs are) is decoded in one pass (Decoder::decode_exact);
// at its first deviation the general, tolerant parse takes the text. Two
// callers share the core: the registered ops (tensors) and pyapi.h (str).
#pragma once

#include <array>
#include <atomic>
#include <charconv>
#include <cstring>
#include <numeric>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fastvision::masks {

// Repair kinds (fastvision/masks/rrle.py words them; keep the two in step).
enum Repair : int64_t {
  kRowSep = 0,        // row separator written differently (e.g. "\n" without the space)
  kRunSep = 1,        // run separator written differently ("|" without the space)
  kCountSep = 2,      // count separator written differently ("* 3", "*3")
  kEnd = 3,           // the text does not end with `end`
  kEmptyRow = 4,      // a blank row, dropped
  kBadRun = 5,        // a run without label or with a bad or zero count, dropped
  kMissingCount = 6,  // a run without count, taken as 1
  kTruncated = 7,     // the text is cut off inside its last run, which is dropped
  kRowPadded = 8,     // a row's counts sum to less than w: padded with its last label
  kRowTruncated = 9,  // a row's counts sum to more than w: cut at w
  kRowsMissing = 10,  // fewer than h rows: the last row repeated
  kRowsExtra = 11,    // more than h rows: dropped
  kImagePadded = 12,  // image-wise runs sum to less than h * w: padded with the last label
  kImageTruncated = 13,
};

struct Run {
  int64_t label, count, row, col;
};

inline bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r'; }

inline std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// A separator without its spaces ("\n " -> "\n", " *" -> "*"); itself if only spaces.
inline std::string core_of(const std::string& sep) {
  std::string c;
  for (char ch : sep)
    if (ch != ' ') c += ch;
  return c.empty() ? sep : c;
}

inline bool all_digits(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

// Counts saturate here: a row is cut at w anyway, and no int64 overflows.
constexpr int64_t kCountCap = int64_t(1) << 40;

inline int64_t parse_count(std::string_view s) {
  int64_t v = 0;
  for (char c : s) v = std::min<int64_t>(kCountCap, v * 10 + (c - '0'));
  return v;
}

inline void check_separators(const char* op, const std::string& run_sep, const std::string& row_sep,
                             const std::string& count_sep) {
  FV_CHECK(!run_sep.empty() && !row_sep.empty() && !count_sep.empty(), op,
           "run_sep, row_sep and count_sep must not be empty; got ", '"', run_sep, "\", \"", row_sep, "\", \"",
           count_sep, '"');
  const std::string r = core_of(run_sep), w = core_of(row_sep), c = core_of(count_sep);
  FV_CHECK(r != w && r != c && w != c, op, "run_sep, row_sep and count_sep must differ (without spaces); got \"",
           run_sep, "\", \"", row_sep, "\", \"", count_sep, '"');
}

// ---------------------------------------------------------------------------
// Encode

// The end of the run of L[i] in [i, e): blocks of 8 compared at once (vectorised), then one by one.
inline int64_t run_end(const int64_t* L, int64_t i, int64_t e) {
  const int64_t v = L[i];
  int64_t j = i + 1;
  for (; j + 8 <= e; j += 8) {
    int64_t diff = 0;
    for (int k = 0; k < 8; ++k) diff |= L[j + k] ^ v;
    if (diff) break;
  }
  while (j < e && L[j] == v) ++j;
  return j;
}

inline int64_t decimal_digits(int64_t v) {
  int64_t n = 1;
  for (; v >= 10; v /= 10) ++n;
  return n;
}

// Grids of label ids into text, for one set of names and separators. One
// pass per grid: each label's "{name}{count_sep}" is prepared once per call,
// and every piece is copied in whole 16-byte blocks (the pieces sit in a
// padded arena, the output keeps room past its end), so a run costs a few
// vector moves and its count's digits.
class GridEncoder {
 public:
  GridEncoder(const std::vector<std::string_view>& names, std::string_view run_sep, std::string_view row_sep,
              std::string_view count_sep, std::string_view end, int64_t form)
      : form_(form) {
    auto add = [this](std::string_view a, std::string_view b) {
      offsets_.push_back(arena_.size());
      arena_.append(a).append(b);
      longest_ = std::max(longest_, arena_.size() - offsets_.back());
    };
    for (std::string_view n : names) add(n, form == 2 ? std::string_view() : count_sep);
    add(run_sep, {});
    add(row_sep, {});
    add(end, {});
    offsets_.push_back(arena_.size());
    arena_.append(kBlock, '\0');  // (the last piece's block copy reads up to here)
  }

  // The text of grid L (h, w) in buf[0, returned length) (buf resized as needed; its capacity is reused).
  size_t encode(const int64_t* L, int64_t h, int64_t w, std::string& buf) const {
    const size_t K = offsets_.size() - 4, run = K, row = K + 1, end = K + 2;
    const int64_t max_count = form_ == 2 ? 0 : form_ == 1 ? h * w : w;
    const size_t per_run = 2 * longest_ + static_cast<size_t>(decimal_digits(max_count)) + kBlock;
    char* p = buf.data();
    auto room = [&](size_t need) {  // p may write `need` more bytes
      const size_t pos = static_cast<size_t>(p - buf.data());
      if (buf.size() < pos + need) {
        buf.resize(std::max(2 * buf.size(), pos + need));
        p = buf.data() + pos;
      }
    };
    auto runs = [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e;) {
        const int64_t j = form_ == 2 ? i + 1 : run_end(L, i, e);
        room(per_run);
        if (i != b) put(p, run);
        put(p, static_cast<size_t>(L[i]));
        if (form_ != 2) p = write_count(p, j - i);
        i = j;
      }
    };
    if (form_ == 1) {
      runs(0, h * w);
    } else {
      for (int64_t r = 0; r < h; ++r) {
        room(per_run);
        if (r > 0) put(p, row);
        runs(r * w, (r + 1) * w);
      }
    }
    room(per_run);
    put(p, end);
    return static_cast<size_t>(p - buf.data());
  }

 private:
  static constexpr size_t kBlock = 16;
  int64_t form_;
  std::string arena_;            // the pieces: names (+ count_sep), run_sep, row_sep, end; then kBlock zeros
  std::vector<size_t> offsets_;  // piece k is arena_[offsets_[k], offsets_[k + 1])
  size_t longest_ = 0;

  void put(char*& p, size_t k) const {
    const char* s = arena_.data() + offsets_[k];
    const size_t n = offsets_[k + 1] - offsets_[k];
    for (size_t i = 0; i < n; i += kBlock) std::memcpy(p + i, s + i, kBlock);
    p += n;
  }
  static char* write_count(char* p, int64_t n) {
    if (n >= 100) return std::to_chars(p, p + 24, n).ptr;
    // One or two digits without a branch on which (counts of a row mix them):
    // both are written, the cursor moves past the ones the count has.
    const int two = n >= 10;
    p[0] = static_cast<char>('0' + (two ? n / 10 : n));
    p[1] = static_cast<char>('0' + n % 10);
    return p + 1 + two;
  }
};

// Every label id of the n = B * h * w in L indexes the K names.
inline void check_label_ids(const char* op, const int64_t* L, int64_t n, int64_t h, int64_t w, int64_t K) {
  // A vectorised scan first (an id is bad iff it or K - 1 - it has the sign
  // bit, in unsigned arithmetic); the first bad id is looked for only when there is one.
  uint64_t any = 0;
  const uint64_t last = static_cast<uint64_t>(K) - 1;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t v = static_cast<uint64_t>(L[i]);
    any |= v | (last - v);
  }
  if (!(any >> 63)) return;
  for (int64_t i = 0; i < n; ++i)
    FV_CHECK(L[i] >= 0 && L[i] < K, op, "labels[", i / (h * w), ", ", (i % (h * w)) / w, ", ", i % w, "] = ", L[i],
             " is not an index into the ", K, " names");
}

// labels (B, h, w) or (h, w) -> the texts' UTF-8 bytes, concatenated, and text_offsets (B + 1).
std::tuple<Tensor, Tensor> rrle_encode_cpu(Tensor labels, Tensor names, Tensor name_offsets, std::string run_sep,
                                           std::string row_sep, std::string count_sep, std::string end,
                                           int64_t form) {
  const char* op = "rrle_encode";
  check_cpu(op, "labels", labels);
  check_dtype_is(op, "labels", labels, ScalarType::Long, "indices into names");
  FV_CHECK(labels.dim() == 2 || labels.dim() == 3, op, "labels must be (h, w) or (B, h, w); got shape ",
           shape_str(labels));
  check_contiguous(op, "labels", labels);
  check_host_1d(op, "names", names, ScalarType::Byte, "(total bytes,): every name's UTF-8, concatenated");
  const int64_t* no = check_offsets(op, "name_offsets", name_offsets, names.size(0), "names");
  const int64_t K = name_offsets.size(0) - 1;
  FV_CHECK(form >= 0 && form <= 2, op, "form must be 0 (row-wise runs), 1 (image-wise runs) or 2 (one label per "
           "patch); got ", form);
  check_separators(op, run_sep, row_sep, count_sep);
  const int64_t B = labels.dim() == 3 ? labels.size(0) : 1;
  const int64_t h = labels.size(labels.dim() - 2), w = labels.size(labels.dim() - 1);
  const int64_t* L = static_cast<const int64_t*>(labels.const_data_ptr());
  check_label_ids(op, L, B * h * w, h, w, K);
  const char* nb = static_cast<const char*>(names.const_data_ptr());
  std::vector<std::string_view> nv;
  for (int64_t k = 0; k < K; ++k) nv.emplace_back(nb + no[k], static_cast<size_t>(no[k + 1] - no[k]));
  const GridEncoder encoder(nv, run_sep, row_sep, count_sep, end, form);
  std::vector<std::vector<uint8_t>> texts(static_cast<size_t>(B));
  parallel_for(op, 0, B, 16, [&](int64_t lo, int64_t hi) {
    std::string s;
    for (int64_t b = lo; b < hi; ++b) {
      const size_t n = encoder.encode(L + b * h * w, h, w, s);
      texts[b].assign(s.data(), s.data() + n);
    }
  });
  return concat(op, "text", texts, labels, ScalarType::Byte);
}

// ---------------------------------------------------------------------------
// Decode

// The separators of a call and their cores, shared by every text's Decoder.
struct Seps {
  std::string run_sep, row_sep, count_sep, end, rc, uc, cc;
  // Whether exact texts can take Decoder::decode_exact: each core one
  // non-space character, run_sep and row_sep their core then spaces, count_sep
  // spaces, its core, spaces (count_lead: the leading spaces).
  bool exact_path = false;
  size_t count_lead = 0;

  Seps(std::string run, std::string row, std::string count, std::string end_marker)
      : run_sep(std::move(run)), row_sep(std::move(row)), count_sep(std::move(count)), end(std::move(end_marker)),
        rc(core_of(row_sep)), uc(core_of(run_sep)), cc(core_of(count_sep)) {
    auto spaces = [](std::string_view v) { return v.find_first_not_of(' ') == std::string_view::npos; };
    auto core_then_spaces = [&](const std::string& sep, const std::string& core) {
      return core.size() == 1 && core[0] != ' ' && sep[0] == core[0] && spaces(std::string_view(sep).substr(1));
    };
    count_lead = count_sep.find_first_not_of(' ');
    exact_path = core_then_spaces(run_sep, uc) && core_then_spaces(row_sep, rc) && cc.size() == 1 && cc[0] != ' ' &&
                 count_lead != std::string::npos && core_then_spaces(count_sep.substr(count_lead), cc);
  }
};

inline bool same(std::string_view a, std::string_view b) {  // (short labels: no memcmp call)
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// Separators are a few characters: these search and compare them without the
// library's per-position memcmp calls (string_view::find / rfind / compare).
inline bool at(std::string_view s, size_t i, std::string_view sep) {  // s[i:] starts with sep
  return i <= s.size() && s.size() - i >= sep.size() && same(s.substr(i, sep.size()), sep);
}
inline size_t find_sep(std::string_view s, std::string_view sep, size_t from = 0) {
  return sep.size() == 1 ? s.find(sep[0], from) : s.find(sep, from);
}
inline size_t rfind_sep(std::string_view s, std::string_view sep) {
  return sep.size() == 1 ? s.rfind(sep[0]) : s.rfind(sep);
}

// The first of a, b or c in s[from:] (s.size() if none): 16 bytes at a time where SSE2 is.
inline size_t find_any_of3(std::string_view s, size_t from, char a, char b, char c) {
  size_t i = from;
#if defined(__SSE2__)
  const __m128i va = _mm_set1_epi8(a), vb = _mm_set1_epi8(b), vc = _mm_set1_epi8(c);
  for (; i + 16 <= s.size(); i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.data() + i));
    const int hit = _mm_movemask_epi8(
        _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, va), _mm_cmpeq_epi8(v, vb)), _mm_cmpeq_epi8(v, vc)));
    if (hit) return i + static_cast<size_t>(__builtin_ctz(static_cast<unsigned>(hit)));
  }
#endif
  while (i < s.size() && s[i] != a && s[i] != b && s[i] != c) ++i;
  return i;
}

// Labels in order of first appearance, with ids: a scan while there are few
// (grids use few labels; a hash map costs more), then a hash map.
struct LabelTable {
  std::vector<std::string_view> labels;
  std::unordered_map<std::string_view, int64_t> ids;
  static constexpr int64_t kScan = 16;

  void clear() {
    labels.clear();
    ids.clear();
  }
  // Back to its first n labels.
  void truncate(size_t n) {
    if (labels.size() <= n) return;
    labels.resize(n);
    ids.clear();
    if (static_cast<int64_t>(n) > kScan)
      for (size_t k = 0; k < n; ++k) ids.emplace(labels[k], static_cast<int64_t>(k));
  }
  int64_t id(std::string_view label) {
    const int64_t n = static_cast<int64_t>(labels.size());
    if (n <= kScan) {
      for (int64_t k = 0; k < n; ++k)
        if (same(labels[k], label)) return k;
      if (n == kScan)
        for (int64_t k = 0; k < n; ++k) ids.emplace(labels[k], k);
    } else if (auto it = ids.find(label); it != ids.end()) {
      return it->second;
    }
    if (n >= kScan) ids.emplace(label, n);
    labels.push_back(label);
    return n;
  }
};

struct Decoder {
  const char* op = "rrle_decode";
  std::string_view text;
  const Seps* seps = nullptr;
  bool strict = false;
  std::vector<std::string_view> rows_buf, toks_buf;  // reused by split()
  std::vector<bool> row_exact, run_exact;
  std::vector<Run> runs;

  // Ready for the next text (buffers kept: one Decoder serves a thread's texts).
  void reset() {
    table.clear();
    repairs.clear();
    runs.clear();
  }
  LabelTable table;  // the text's labels (local ids)
  std::vector<std::array<int64_t, 4>> repairs;

  // Reports repair `kind` at (row, col); separator kinds once (with their occurrences).
  void repair(int64_t kind, int64_t row, int64_t col) {
    if (kind <= kEnd)
      for (auto& r : repairs)
        if (r[0] == kind) {
          ++r[3];
          return;
        }
    repairs.push_back({kind, row, col, 1});
  }

  // Splits s at every `core` into `out`; `exact_at[i]` says whether split i reads `exact`.
  static void split(std::string_view s, const std::string& core, const std::string& exact,
                    std::vector<std::string_view>& out, std::vector<bool>& exact_at) {
    out.clear();
    exact_at.clear();
    size_t b = 0;
    for (;;) {
      const size_t i = find_sep(s, core, b);
      if (i == std::string_view::npos) {
        out.push_back(s.substr(b));
        return;
      }
      out.push_back(s.substr(b, i - b));
      const bool ex = at(s, i, exact);
      exact_at.push_back(ex);
      b = i + (ex ? exact.size() : core.size());
    }
  }

  // A text written exactly (the separators as given, h rows whose counts sum
  // to w, labels without surrounding spaces or separator cores, counts >= 1)
  // decoded in one pass into g (h * w): the general parse would find the
  // same runs and no repair. False at the first deviation (g then holds
  // anything, the table is as it was): the general parse takes the text.
  bool decode_exact(int64_t h, int64_t w, int64_t* g) {
    if (!seps->exact_path || h <= 0 || w <= 0) return false;
    const size_t seeded = table.labels.size();
    auto fail = [&] {
      table.truncate(seeded);
      return false;
    };
    const std::string_view t = text;
    const size_t n = t.size(), lead = seps->count_lead, npos = std::string_view::npos;
    const char rc = seps->rc[0], uc = seps->uc[0], cc = seps->cc[0];
    // Where the text goes on after row r's text, which ends at q (npos: not at its separator).
    auto after_row = [&](int64_t r, size_t q) {
      if (r + 1 < h) return at(t, q, seps->row_sep) ? q + seps->row_sep.size() : npos;
      return n - q == seps->end.size() && at(t, q, seps->end) ? n : npos;
    };
    size_t p = 0, prev = 0, prev_len = 0;  // the previous row's text: t[prev, prev + prev_len)
    for (int64_t r = 0; r < h; ++r) {
      int64_t* row = g + r * w;
      // A row written as the previous one holds its ids (shapes span rows: most rows repeat).
      if (r > 0 && n - p >= prev_len && std::memcmp(t.data() + p, t.data() + prev, prev_len) == 0) {
        if (const size_t next = after_row(r, p + prev_len); next != npos) {
          std::memcpy(row, row - w, static_cast<size_t>(w) * sizeof(int64_t));
          p = next;
          continue;
        }
      }
      const size_t start = p;
      for (int64_t col = 0;;) {
        // The label ends where count_sep begins: before the count core and its leading spaces.
        size_t q = find_any_of3(t, p, cc, uc, rc);
        if (q == n || t[q] != cc || q - p <= lead || !at(t, q - lead, seps->count_sep)) return fail();
        const std::string_view label = t.substr(p, q - lead - p);
        if (is_space(label.front()) || is_space(label.back())) return fail();
        q += seps->count_sep.size() - lead;
        const size_t digits = q;
        int64_t count = 0;
        for (; q < n && q - digits < 13 && t[q] >= '0' && t[q] <= '9'; ++q) count = count * 10 + (t[q] - '0');
        if (q == digits || count == 0 || count > w - col) return fail();
        std::fill(row + col, row + col + count, table.id(label));
        col += count;
        if (col < w) {
          if (!at(t, q, seps->run_sep)) return fail();
          p = q + seps->run_sep.size();
          continue;
        }
        prev = start;
        prev_len = q - start;
        p = after_row(r, q);
        if (p == npos) return fail();
        break;
      }
    }
    return true;
  }

  // Parses the text into runs (row, col); returns the number of rows.
  int64_t parse(std::vector<Run>& runs, bool& has_counts) {
    const std::string &run_sep = seps->run_sep, &row_sep = seps->row_sep, &count_sep = seps->count_sep,
                      &end = seps->end, &rc = seps->rc, &uc = seps->uc, &cc = seps->cc;
    std::string_view body = text;
    if (body.size() >= end.size() && at(body, body.size() - end.size(), end)) {
      body.remove_suffix(end.size());
    } else {
      FV_CHECK(!strict, op, "the text must end with the end marker \"", end, "\"");
      repair(kEnd, -1, -1);
      body = trim(body);
      const std::string ec = core_of(end);
      if (body.size() >= ec.size() && at(body, body.size() - ec.size(), ec))
        body.remove_suffix(ec.size());
    }
    has_counts = find_sep(body, cc) != std::string_view::npos;
    std::vector<std::string_view>& rows = rows_buf;
    split(body, rc, row_sep, rows, row_exact);
    if (rows.size() == 1 && trim(rows[0]).empty()) rows.clear();  // no rows at all
    int64_t row = 0;
    for (size_t ri = 0; ri < rows.size(); ++ri) {
      if (ri > 0 && !row_exact[ri - 1]) {
        FV_CHECK(!strict, op, "row ", row, ", column 0: rows must be separated by \"", row_sep, "\"");
        repair(kRowSep, row, 0);
      }
      if (trim(rows[ri]).empty()) {
        FV_CHECK(!strict, op, "row ", row, ", column 0: the row is empty");
        repair(kEmptyRow, row, 0);
        continue;
      }
      std::vector<std::string_view>& toks = toks_buf;
      split(rows[ri], uc, run_sep, toks, run_exact);
      int64_t col = 0;
      for (size_t ti = 0; ti < toks.size(); ++ti) {
        if (ti > 0 && !run_exact[ti - 1]) {
          FV_CHECK(!strict, op, "row ", row, ", column ", col, ": runs must be separated by \"", run_sep, "\"");
          repair(kRunSep, row, col);
        }
        const bool last = ri + 1 == rows.size() && ti + 1 == toks.size();
        std::string_view tok = strict ? toks[ti] : trim(toks[ti]);
        if (tok.empty()) {
          FV_CHECK(!strict, op, "row ", row, ", column ", col, ": empty run");
          repair(last ? kTruncated : kBadRun, row, col);
          continue;
        }
        std::string_view label, digits;
        bool exact = true;
        if (strict) {
          const size_t p = has_counts ? rfind_sep(tok, count_sep) : std::string_view::npos;
          if (has_counts) {
            FV_CHECK(p != std::string_view::npos, op, "row ", row, ", column ", col, ": run \"", tok,
                     "\" has no \"", count_sep, "\"");
            label = tok.substr(0, p);
            digits = tok.substr(p + count_sep.size());
            FV_CHECK(all_digits(digits), op, "row ", row, ", column ", col, ": run \"", tok,
                     "\" has no count after \"", count_sep, "\"");
          } else {
            label = tok;
          }
          FV_CHECK(!label.empty(), op, "row ", row, ", column ", col, ": run \"", tok, "\" has no label");
        } else {
          const size_t p = rfind_sep(tok, cc);
          if (p == std::string_view::npos) {
            label = tok;
            if (has_counts) {
              repair(last ? kTruncated : kMissingCount, row, col);
              if (last) continue;
            }
          } else {
            label = trim(tok.substr(0, p));
            digits = trim(tok.substr(p + cc.size()));
            if (!all_digits(digits) || label.empty()) {
              repair(last ? kTruncated : kBadRun, row, col);
              continue;
            }
            exact = tok.size() == label.size() + count_sep.size() + digits.size() &&
                    at(tok, label.size(), count_sep);
          }
        }
        const int64_t count = digits.empty() ? 1 : parse_count(digits);
        if (count == 0) {
          FV_CHECK(!strict, op, "row ", row, ", column ", col, ": run \"", tok, "\" has count 0");
          repair(kBadRun, row, col);
          continue;
        }
        if (!exact) repair(kCountSep, row, col);
        runs.push_back({table.id(label), count, row, col});
        col = std::min(kCountCap, col + count);
      }
      ++row;
    }
    return row;
  }
};

// Whether decode_text tries Decoder::decode_exact first (the tests turn it off
// to compare both paths: fastvision._C._rrle_exact_path).
inline std::atomic<bool> exact_path_enabled{true};

// Decodes one text into g (h * w local label ids, -1: nothing to fill with); fills d.labels, d.repairs.
// True when every patch got a label (no -1 left).
bool decode_text(Decoder& d, std::string_view text, int64_t h, int64_t w, const Seps& seps, bool strict,
                 int64_t form, int64_t* g) {
  const char* op = d.op;
  const int64_t area = h * w;
  d.text = text;
  d.seps = &seps;
  d.strict = strict;
  if (form <= 0 && exact_path_enabled.load(std::memory_order_relaxed) && d.decode_exact(h, w, g)) return true;
  std::vector<Run>& runs = d.runs;
  bool has_counts = false;
  const int64_t rows = d.parse(runs, has_counts);
  if (form == -1) form = rows == 1 && h > 1 && !runs.empty() && runs.back().col + runs.back().count > w ? 1 : 0;
  if (form == 2)
    FV_CHECK(!has_counts || !strict, op, "one label per patch was asked for, but the text has counts");

  std::fill(g, g + area, int64_t(-1));
  if (form == 1) {  // image-wise: one sequence over the raster order
    FV_CHECK(!strict || rows <= 1, op, "image-wise runs have no row separators; got ", rows, " rows");
    int64_t p = 0;
    for (const Run& r : runs) {
      const int64_t n = std::min(r.count, area - p);
      std::fill(g + p, g + p + n, r.label);
      p += n;
      if (n < r.count) {
        FV_CHECK(!strict, op, "row ", r.row, ", column ", r.col, ": the runs cover more than h * w = ", area,
                 " patches");
        d.repair(kImageTruncated, r.row, r.col);
        break;
      }
    }
    if (p < area) {
      FV_CHECK(!strict, op, "the runs cover ", p, " patches, not h * w = ", area);
      d.repair(kImagePadded, p / std::max<int64_t>(w, 1), w ? p % w : 0);
      if (p > 0) std::fill(g + p, g + area, g[p - 1]);
    }
  } else {
    size_t k = 0;
    for (int64_t r = 0; r < rows; ++r) {
      int64_t col = 0;
      bool cut = false;
      for (; k < runs.size() && runs[k].row == r; ++k) {
        if (r >= h) continue;
        const Run& run = runs[k];
        const int64_t n = std::min(run.count, w - col);
        if (n < run.count && !cut) {
          FV_CHECK(!strict, op, "row ", r, ", column ", run.col, ": the row's counts sum to more than w = ", w);
          d.repair(kRowTruncated, r, run.col);
          cut = true;
        }
        std::fill(g + r * w + col, g + r * w + col + n, run.label);
        col += n;
      }
      if (r >= h) continue;
      if (col < w) {
        FV_CHECK(!strict, op, "row ", r, ", column ", col, ": the row's counts sum to ", col, ", not w = ", w);
        d.repair(kRowPadded, r, col);
        if (col > 0) std::fill(g + r * w + col, g + (r + 1) * w, g[r * w + col - 1]);
      }
    }
    if (rows < h) {
      FV_CHECK(!strict, op, "row ", rows, ", column 0: got ", rows, " rows, not h = ", h);
      d.repair(kRowsMissing, rows, 0);
      if (rows > 0)
        for (int64_t r = rows; r < h; ++r) std::copy(g + (rows - 1) * w, g + rows * w, g + r * w);
    } else if (rows > h) {
      FV_CHECK(!strict, op, "row ", h, ", column 0: got ", rows, " rows, not h = ", h);
      d.repair(kRowsExtra, h, 0);
    }
  }
  return false;
}

// The integer arguments of a decode call (rrle_decode and the Python fast path).
inline void check_decode_ints(const char* op, int64_t h, int64_t w, int64_t form, int64_t fill) {
  check_at_least(op, "h", h, 0);
  check_at_least(op, "w", w, 0);
  int64_t area = 0;
  FV_CHECK(mul_fits(h, w, &area) && area <= (int64_t(1) << 40), op, "h * w must be at most 2^40; got h = ", h,
           ", w = ", w);
  FV_CHECK(form >= -1 && form <= 2, op, "form must be -1 (detect), 0 (row-wise runs), 1 (image-wise runs) or 2 "
           "(one label per patch); got ", form);
  FV_CHECK(fill >= -1, op, "fill must be -1 (keep) or a label id; got ", fill);
}

// What a batch decode found: the label table (the known names first, so their
// ids are the caller's, then the other labels in order of first appearance
// over the batch; views into the names and texts) and the repairs (text,
// kind, row, column, occurrences).
struct DecodedBatch {
  std::vector<std::string_view> labels;
  std::vector<std::array<int64_t, 5>> repairs;
};

// Decodes texts[b] into g + b * h * w (label ids of the batch's table; where
// nothing was decoded to fill with, `fill`, or -1 when fill is -1). Arguments checked.
inline DecodedBatch decode_batch(const char* op, const std::vector<std::string_view>& texts, int64_t h, int64_t w,
                                 const Seps& seps, bool strict, int64_t form, int64_t fill,
                                 const std::vector<std::string_view>& names, int64_t* g) {
  const int64_t B = static_cast<int64_t>(texts.size()), area = h * w;
  struct Found {
    int64_t seeded = 0;                     // the text's ids below this are the batch table's
    bool complete = false;                  // every patch got a label
    std::vector<std::string_view> labels;   // its other labels, in order (ids seeded, seeded + 1, ...)
    std::vector<std::array<int64_t, 4>> repairs;
  };
  std::vector<Found> dec(static_cast<size_t>(B));
  // A few known names seed each text's table, so that its ids are already the
  // batch table's (no mapping afterwards) unless it holds other labels.
  const bool seed = static_cast<int64_t>(names.size()) <= LabelTable::kScan;
  auto decode = [&](int64_t lo, int64_t hi) {
    thread_local Decoder d;  // its buffers serve every call on this thread
    for (int64_t b = lo; b < hi; ++b) {
      d.reset();
      for (std::string_view name : names)
        if (seed) d.table.id(name);
      dec[b].seeded = static_cast<int64_t>(d.table.labels.size());
      dec[b].complete = decode_text(d, texts[b], h, w, seps, strict, form, g + b * area);
      dec[b].labels.assign(d.table.labels.begin() + dec[b].seeded, d.table.labels.end());
      dec[b].repairs = d.repairs;
    }
  };
  if (B == 1)
    decode(0, 1);  // (one small text: the thread pool's hand-off would cost more than the work)
  else
    parallel_for(op, 0, B, 8, decode);
  DecodedBatch out;
  LabelTable table;
  for (std::string_view name : names) table.id(name);  // (names are distinct; a duplicate would keep the first)
  std::vector<int64_t> lut;
  for (int64_t b = 0; b < B; ++b) {
    lut.resize(static_cast<size_t>(dec[b].seeded));
    std::iota(lut.begin(), lut.end(), int64_t(0));
    bool identity = true;
    for (std::string_view label : dec[b].labels) {
      const int64_t id = table.id(label);
      identity = identity && id == static_cast<int64_t>(lut.size());
      lut.push_back(id);
    }
    int64_t* gb = g + b * area;
    if (!identity)
      for (int64_t i = 0; i < area; ++i) gb[i] = gb[i] >= 0 ? lut[gb[i]] : fill >= 0 ? fill : gb[i];
    else if (fill >= 0 && !dec[b].complete)  // ids already the table's: only the unfilled (-1) patches change
      for (int64_t i = 0; i < area; ++i) gb[i] = gb[i] < 0 ? fill : gb[i];
    for (const auto& r : dec[b].repairs) out.repairs.push_back({b, r[0], r[1], r[2], r[3]});
  }
  out.labels = std::move(table.labels);
  return out;
}

// texts (bytes, concatenated; text_offsets (B + 1)) -> labels (B, h, w) of label ids
// (decode_batch's table), the table's bytes and offsets, repairs (K, 5).
std::tuple<Tensor, Tensor, Tensor, Tensor> rrle_decode_cpu(Tensor text, Tensor text_offsets, Tensor names,
                                                           Tensor name_offsets, int64_t fill, int64_t h, int64_t w,
                                                           std::string run_sep, std::string row_sep,
                                                           std::string count_sep, std::string end, bool strict,
                                                           int64_t form) {
  const char* op = "rrle_decode";
  check_host_1d(op, "text", text, ScalarType::Byte, "(bytes,): the UTF-8 texts, concatenated");
  const int64_t* to = check_offsets(op, "text_offsets", text_offsets, text.size(0), "text");
  const int64_t B = text_offsets.size(0) - 1;
  check_decode_ints(op, h, w, form, fill);
  check_separators(op, run_sep, row_sep, count_sep);
  check_host_1d(op, "names", names, ScalarType::Byte, "(total bytes,): the known names' UTF-8, concatenated");
  const int64_t* no = check_offsets(op, "name_offsets", name_offsets, names.size(0), "names");
  const int64_t K = name_offsets.size(0) - 1;
  int64_t total = 0;
  FV_CHECK(mul_fits(B, h * w, &total), op, "B * h * w overflows int64");
  Tensor grid = alloc_empty(op, "labels", text, {B, h, w}, ScalarType::Long);
  const char* chars = static_cast<const char*>(text.const_data_ptr());
  const char* nb = static_cast<const char*>(names.const_data_ptr());
  std::vector<std::string_view> texts, nv;
  for (int64_t b = 0; b < B; ++b) texts.emplace_back(chars + to[b], static_cast<size_t>(to[b + 1] - to[b]));
  for (int64_t k = 0; k < K; ++k) nv.emplace_back(nb + no[k], static_cast<size_t>(no[k + 1] - no[k]));
  const Seps seps(run_sep, row_sep, count_sep, end);
  const DecodedBatch found = decode_batch(op, texts, h, w, seps, strict, form, fill, nv,
                                          static_cast<int64_t*>(grid.mutable_data_ptr()));
  std::vector<std::vector<uint8_t>> labels;
  for (std::string_view label : found.labels) labels.emplace_back(label.begin(), label.end());
  auto [bytes, offsets] = concat(op, "label names", labels, text, ScalarType::Byte);
  Tensor rep = alloc_empty(op, "repairs", text, {static_cast<int64_t>(found.repairs.size()), 5}, ScalarType::Long);
  int64_t* rp = static_cast<int64_t*>(rep.mutable_data_ptr());
  for (size_t i = 0; i < found.repairs.size(); ++i)
    for (int j = 0; j < 5; ++j) rp[5 * i + j] = found.repairs[i][j];
  return {grid, bytes, offsets, rep};
}

}  // namespace fastvision::masks
