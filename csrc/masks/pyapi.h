// The mask codecs' plain CPython functions (fastvision._C.rle_iou_coco,
// rrle_encode, rrle_decode): the paths fastvision.masks takes for Python
// objects. A torch op call costs microseconds of argument conversion and
// dispatch before any work, which is the whole cost of encoding or decoding
// one small R-RLE grid, and pycocotools' iou takes a list of dicts whose
// strings would otherwise be joined into tensors first. These functions take
// the Python objects as they are (str, bytes, lists, dicts, a CPU int64
// tensor), run the same C++ codec cores as the torch ops (rrle.h, the IoU
// kernel of cpu.cpp) and check every argument as the ops do (ValueError naming
// the argument; never a read out of bounds). Where an input is not of the
// form they read directly they return NotImplemented (None for rle_iou_coco)
// and the caller converts it and takes the general path.
//
// Limited API (CPython >= 3.10, one abi3 library): no buffer protocol there,
// so a tensor is read through its own attributes (exact torch.Tensor, int64,
// CPU, strided, contiguous, not a negative view) and data_ptr().
// Included by cpu.cpp after rrle.h.
#pragma once

#include <Python.h>

#include <atomic>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <utility>

namespace fastvision::masks::py {

// Owned reference.
struct Ref {
  PyObject* p = nullptr;
  Ref() = default;
  explicit Ref(PyObject* o) : p(o) {}
  Ref(Ref&& o) noexcept : p(o.release()) {}
  Ref& operator=(Ref&& o) noexcept {
    if (this != &o) {
      Py_XDECREF(p);
      p = o.release();
    }
    return *this;
  }
  ~Ref() { Py_XDECREF(p); }
  PyObject* release() {
    PyObject* o = p;
    p = nullptr;
    return o;
  }
};

// Thrown when a Python error is already set.
struct PyError {};

inline PyObject* check(PyObject* o) {
  if (!o) throw PyError{};
  return o;
}

// The GIL released for the scope.
struct NoGil {
  PyThreadState* state = PyEval_SaveThread();
  ~NoGil() { PyEval_RestoreThread(state); }
};

// Sets the Python exception for the C++ one in flight (as pybind11 translates the ops').
inline PyObject* set_error() {
  try {
    throw;
  } catch (const PyError&) {
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc& e) {
    PyErr_SetString(PyExc_MemoryError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// torch's objects, looked up once (torch is imported before fastvision._C is).
struct Torch {
  PyObject *tensor, *int64, *strided;
  PyObject *dtype, *layout, *is_cpu, *is_contiguous, *is_neg, *shape, *data_ptr;
};

inline const Torch& torch_objects() {
  static const Torch t = [] {
    Ref mod(check(PyImport_ImportModule("torch")));
    Torch r;
    r.tensor = check(PyObject_GetAttrString(mod.p, "Tensor"));
    r.int64 = check(PyObject_GetAttrString(mod.p, "int64"));
    r.strided = check(PyObject_GetAttrString(mod.p, "strided"));
    for (auto [slot, name] : {std::pair{&r.dtype, "dtype"}, {&r.layout, "layout"}, {&r.is_cpu, "is_cpu"},
                              {&r.is_contiguous, "is_contiguous"}, {&r.is_neg, "is_neg"}, {&r.shape, "shape"},
                              {&r.data_ptr, "data_ptr"}})
      *slot = check(PyUnicode_InternFromString(name));
    return r;
  }();
  return t;
}

// DLPack's C structs (its ABI, version 1), written out: torch's dlpack.h is
// outside the stable ABI.
namespace dl {
struct Version {
  uint32_t major, minor;
};
struct Device {
  int32_t type, id;  // type 1: CPU
};
struct DataType {
  uint8_t code, bits;  // code 0: signed integer
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t *shape, *strides;
  uint64_t byte_offset;
};
struct ManagedTensorVersioned {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned*);
  uint64_t flags;
  Tensor tensor;
};
struct ExchangeAPI {  // (the functions this does not call as void*)
  Version version;
  void* prev_api;
  void *managed_tensor_allocator, *managed_tensor_from_py_object_no_sync;
  int (*managed_tensor_to_py_object_no_sync)(ManagedTensorVersioned* tensor, void** out_py_object);
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);  // (may be null)
};
}  // namespace dl

// torch's DLPack C exchange API (null where torch has none; tests turn it
// off to take the other paths): new tensors reach torch through it (else a
// capsule and torch._C._from_dlpack), and tensors are read through it (else
// through their Python attributes, about 0.5 us more).
struct DLPackExchange {
  int (*to_py_object)(dl::ManagedTensorVersioned*, void**) = nullptr;
  int (*from_py_object)(void*, dl::Tensor*) = nullptr;
  PyObject* from_dlpack = nullptr;
};
inline std::atomic<bool> dlpack_exchange_enabled{true};

inline const DLPackExchange& dlpack_exchange() {
  static const DLPackExchange h = [] {
    DLPackExchange r;
    Ref torch_c(check(PyImport_ImportModule("torch._C")));
    r.from_dlpack = check(PyObject_GetAttrString(torch_c.p, "_from_dlpack"));  // (what torch.from_dlpack calls)
    if (Ref cap(PyObject_GetAttrString(torch_objects().tensor, "__dlpack_c_exchange_api__")); cap.p) {
      const auto* api = static_cast<const dl::ExchangeAPI*>(PyCapsule_GetPointer(cap.p, "dlpack_exchange_api"));
      if (api && api->version.major == 1) {
        r.to_py_object = api->managed_tensor_to_py_object_no_sync;
        r.from_py_object = api->dltensor_from_py_object_no_sync;
      }
    }
    PyErr_Clear();  // (no exchange API: the other paths)
    return r;
  }();
  static const DLPackExchange off{nullptr, nullptr, h.from_dlpack};
  return dlpack_exchange_enabled.load(std::memory_order_relaxed) ? h : off;
}

// A new CPU int64 tensor, filled here and then handed to torch through
// DLPack: torch wraps it in about 0.5 us through the exchange API, 0.8 us
// through a capsule, where torch.empty (or numpy and torch.from_numpy) costs
// 1.3 to 2 us: as much as decoding a small R-RLE grid.
class NewInt64Tensor {
 public:
  // A contiguous tensor of `shape` (at most 3 dimensions; sizes >= 0 whose
  // product times 8 fits in an int64: the caller has checked).
  explicit NewInt64Tensor(std::initializer_list<int64_t> shape) {
    size_t n = 1;
    for (int64_t s : shape) n *= static_cast<size_t>(s);
    // One allocation: the header, then the data (malloc's alignment, as numpy's); freed by torch's deleter call.
    block_ = static_cast<Block*>(std::malloc(sizeof(Block) + n * sizeof(int64_t)));
    if (!block_) throw std::bad_alloc();
    block_->managed = {{1, 0}, nullptr, [](dl::ManagedTensorVersioned* m) { std::free(m); }, 0,
                       {block_ + 1, {1, 0}, static_cast<int32_t>(shape.size()), {0, 64, 1}, block_->shape,
                        block_->strides, 0}};
    int64_t stride = 1, d = static_cast<int64_t>(shape.size());
    for (auto s = shape.end(); s != shape.begin();) {
      block_->shape[--d] = *--s;
      block_->strides[d] = stride;
      stride *= *s;
    }
  }
  NewInt64Tensor(const NewInt64Tensor&) = delete;
  NewInt64Tensor& operator=(const NewInt64Tensor&) = delete;
  ~NewInt64Tensor() { std::free(block_); }
  int64_t* data() const { return reinterpret_cast<int64_t*>(block_ + 1); }

  // The torch.Tensor (a new reference), which owns the memory from here on.
  PyObject* to_torch() {
    const DLPackExchange& h = dlpack_exchange();
    Block* b = std::exchange(block_, nullptr);
    if (h.to_py_object) {
      void* out = nullptr;
      // (On failure the memory is left to torch, which may have taken it: a leak, never a double free.)
      if (h.to_py_object(&b->managed, &out) != 0) throw PyError{};
      return static_cast<PyObject*>(out);
    }
    Ref cap(PyCapsule_New(&b->managed, kCapsule, [](PyObject* c) {
      if (PyCapsule_IsValid(c, kCapsule)) {  // (not taken by torch)
        auto* m = static_cast<dl::ManagedTensorVersioned*>(PyCapsule_GetPointer(c, kCapsule));
        m->deleter(m);
      }
    }));
    if (!cap.p) {
      std::free(b);
      throw PyError{};
    }
    return check(PyObject_CallFunctionObjArgs(h.from_dlpack, cap.p, nullptr));
  }

 private:
  static constexpr const char* kCapsule = "dltensor_versioned";  // (torch renames it once it owns the memory)
  struct Block {
    dl::ManagedTensorVersioned managed;
    int64_t shape[3], strides[3];
  };
  Block* block_ = nullptr;
};

// A CPU int64 tensor's memory and shape, or nullptr when `obj` is not one this
// can read in place (another type or subclass, dtype, device, layout, a
// non-contiguous or negative view): through DLPack's exchange API where
// torch has one, else through the tensor's attributes.
struct TensorView {
  bool ok = false;
  int64_t* data = nullptr;  // (may be null when empty)
  int64_t shape[3] = {}, dim = 0;  // (at most 3 dimensions: more are not read in place)
};

inline TensorView int64_tensor(PyObject* obj) {
  const Torch& t = torch_objects();
  TensorView v;
  if (reinterpret_cast<PyObject*>(Py_TYPE(obj)) != t.tensor) return v;
  auto attr_is = [&](PyObject* name, PyObject* want) {
    Ref a(check(PyObject_GetAttr(obj, name)));
    return a.p == want;
  };
  auto call_true = [&](PyObject* name) {
    Ref a(check(PyObject_CallMethodObjArgs(obj, name, nullptr)));
    return a.p == Py_True;
  };
  if (const DLPackExchange& x = dlpack_exchange(); x.from_py_object) {
    dl::Tensor d{};
    if (x.from_py_object(obj, &d) != 0) {  // (a tensor DLPack does not describe: not read in place)
      PyErr_Clear();
      return v;
    }
    if (d.device.type != 1 || d.dtype.code != 0 || d.dtype.bits != 64 || d.dtype.lanes != 1 || d.ndim > 3 ||
        call_true(t.is_neg))
      return v;
    int64_t numel = 1, stride = 1;
    for (int i = 0; i < d.ndim; ++i) numel *= d.shape[i];
    for (int i = d.ndim - 1; i >= 0 && d.strides && numel > 0; --i) {  // contiguous as torch says: size-1 dims aside
      if (d.shape[i] != 1 && d.strides[i] != stride) return v;
      stride *= d.shape[i];
    }
    for (int i = 0; i < d.ndim; ++i) v.shape[v.dim++] = d.shape[i];
    v.data = reinterpret_cast<int64_t*>(static_cast<char*>(d.data) + d.byte_offset);
    v.ok = true;
    return v;
  }
  if (!attr_is(t.dtype, t.int64) || !attr_is(t.is_cpu, Py_True) || !attr_is(t.layout, t.strided) ||
      !call_true(t.is_contiguous) || call_true(t.is_neg))
    return v;
  Ref shape(check(PyObject_GetAttr(obj, t.shape)));  // torch.Size: a tuple
  const Py_ssize_t n = PyTuple_Size(shape.p);
  if (n < 0) throw PyError{};
  if (n > 3) return v;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long long s = PyLong_AsLongLong(check(PyTuple_GetItem(shape.p, i)));
    if (s == -1 && PyErr_Occurred()) throw PyError{};
    v.shape[v.dim++] = s;
  }
  Ref ptr(check(PyObject_CallMethodObjArgs(obj, t.data_ptr, nullptr)));
  v.data = static_cast<int64_t*>(PyLong_AsVoidPtr(ptr.p));
  if (!v.data && PyErr_Occurred()) throw PyError{};
  v.ok = true;
  return v;
}

// "... ; got <type name>" as TypeError.
inline PyObject* type_error(const char* what, PyObject* obj) {
  Ref type(check(PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(obj)), "__name__")));
  Ref msg(check(PyUnicode_FromFormat("%s; got %U", what, type.p)));
  PyErr_SetObject(PyExc_TypeError, msg.p);
  return nullptr;
}

inline std::string_view utf8(PyObject* s) {
  Py_ssize_t n = 0;
  const char* p = PyUnicode_AsUTF8AndSize(s, &n);
  if (!p) throw PyError{};
  return {p, static_cast<size_t>(n)};
}

// An integer argument (anything with __index__: 2.5 is an error, not 2), named in the TypeError.
inline int64_t as_int(PyObject* o, const char* name) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
      PyErr_Clear();
      type_error((std::string(name) + " must be an integer").c_str(), o);
    }
    throw PyError{};
  }
  return v;
}

// Items of a list or tuple (borrowed), or false.
inline bool items(PyObject* seq, std::vector<PyObject*>& out) {
  out.clear();
  const bool list = PyList_Check(seq), tuple = !list && PyTuple_Check(seq);
  if (!list && !tuple) return false;
  const Py_ssize_t n = list ? PyList_Size(seq) : PyTuple_Size(seq);
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out.push_back(check(list ? PyList_GetItem(seq, i) : PyTuple_GetItem(seq, i)));
  return true;
}

// The four separators of a Separators (a tuple: run, row, count, end).
inline std::array<std::string, 4> separators(PyObject* seps) {
  std::vector<PyObject*> s;
  std::array<std::string, 4> out;
  if (!items(seps, s) || s.size() != 4) {
    type_error("separators must be a Separators (4 str: run, row, count, end)", seps);
    throw PyError{};
  }
  for (int i = 0; i < 4; ++i) {
    if (!PyUnicode_Check(s[i])) {
      type_error("separators must be 4 str", s[i]);
      throw PyError{};
    }
    out[i] = std::string(utf8(s[i]));
  }
  return out;
}

// ---------------------------------------------------------------------------
// rle_iou_coco(dt, gt, crowd) -> bytearray of (D, G) float64 IoUs, or None

// dt / gt as the IoU kernel takes them, parsed from pycocotools dicts with
// compressed counts; false if any is not of that form (or its string is not ASCII).
struct Parsed {
  std::string chars;
  std::vector<int64_t> char_off{0}, sizes;
};

inline bool gather(PyObject* list, Parsed& p) {
  if (!PyList_Check(list)) return false;
  Ref own(check(PySequence_List(list)));  // our references: a key's __eq__ could change the caller's list
  std::vector<PyObject*> objs;
  items(own.p, objs);
  for (PyObject* o : objs) {
    if (!PyDict_Check(o)) return false;
    Ref counts(Py_XNewRef(PyDict_GetItemString(o, "counts")));
    Ref size(Py_XNewRef(PyDict_GetItemString(o, "size")));
    std::vector<PyObject*> hw;
    if (!counts.p || !size.p || (!PyList_Check(size.p) && !PyTuple_Check(size.p))) return false;
    Ref size_items(check(PySequence_List(size.p)));
    items(size_items.p, hw);
    if (hw.size() != 2 || !PyLong_Check(hw[0]) || !PyLong_Check(hw[1])) return false;
    for (PyObject* v : hw) {
      const long long x = PyLong_AsLongLong(v);
      if (x == -1 && PyErr_Occurred()) {  // beyond int64: the general path words it
        PyErr_Clear();
        return false;
      }
      p.sizes.push_back(x);
    }
    std::string_view s;
    if (PyBytes_Check(counts.p)) {
      char* b = nullptr;
      Py_ssize_t n = 0;
      if (PyBytes_AsStringAndSize(counts.p, &b, &n)) throw PyError{};
      s = {b, static_cast<size_t>(n)};
    } else if (PyUnicode_Check(counts.p)) {
      s = utf8(counts.p);
      for (char c : s)
        if (static_cast<unsigned char>(c) >= 128) return false;
    } else {
      return false;
    }
    p.chars.append(s);
    p.char_off.push_back(static_cast<int64_t>(p.chars.size()));
  }
  return true;
}

// Parses p's strings as rle_from_string does (same checks and messages).
inline void parse(const Parsed& p, Counts& counts, std::vector<int64_t>& offsets) {
  const char* op = "rle_from_string";
  const int64_t n = static_cast<int64_t>(p.char_off.size()) - 1;
  check_size_values(op, "sizes", p.sizes.data(), n);
  std::vector<Counts> out(static_cast<size_t>(n));
  const uint8_t* s = reinterpret_cast<const uint8_t*>(p.chars.data());
  parallel_for(op, 0, n, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      from_string(op, i, s + p.char_off[i], p.char_off[i + 1] - p.char_off[i], p.sizes[2 * i], p.sizes[2 * i + 1],
                  out[i]);
  });
  offsets.assign(1, 0);
  for (const Counts& c : out) offsets.push_back(offsets.back() + static_cast<int64_t>(c.size()));
  counts.clear();
  counts.reserve(static_cast<size_t>(offsets.back()));
  for (const Counts& c : out) counts.insert(counts.end(), c.begin(), c.end());
}

inline PyObject* rle_iou_coco(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  try {
    if (nargs != 3 || !PyBytes_Check(args[2])) {
      PyErr_SetString(PyExc_TypeError, "rle_iou_coco(dt: list[dict], gt: list[dict], crowd: bytes)");
      return nullptr;
    }
    Parsed pd, pg;
    if (!gather(args[0], pd) || !gather(args[1], pg)) Py_RETURN_NONE;
    const int64_t D = static_cast<int64_t>(pd.sizes.size() / 2), G = static_cast<int64_t>(pg.sizes.size() / 2);
    char* crowd = nullptr;
    Py_ssize_t nc = 0;
    if (PyBytes_AsStringAndSize(args[2], &crowd, &nc)) return nullptr;
    FV_CHECK(nc == G, "rle_iou", "iscrowd must have shape (G,) = (", G, ",), one flag per ground truth; got shape (",
             nc, ",)");
    int64_t bytes = 0;
    FV_CHECK(mul_fits(D, G, &bytes) && mul_fits(bytes, 8, &bytes), "rle_iou", "D * G overflows");
    Ref out(check(PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(bytes))));
    double* o = reinterpret_cast<double*>(PyByteArray_AsString(out.p));
    {
      NoGil nogil;  // pd, pg and crowd are this call's (crowd: bytes, immutable, referenced by args)
      Counts dc, gc;
      std::vector<int64_t> doff, goff;
      parse(pd, dc, doff);
      parse(pg, gc, goff);
      const RleBatch d{dc.data(), doff.data(), pd.sizes.data(), D};
      const RleBatch g{gc.data(), goff.data(), pg.sizes.data(), G};
      check_one_size("rle_iou", d, g);
      iou_into("rle_iou", d, g, reinterpret_cast<const uint8_t*>(crowd), o);
    }
    return out.release();
  } catch (...) {
    return set_error();
  }
}

// ---------------------------------------------------------------------------
// R-RLE
//
// A caller passes the same names and separators call after call, and checking
// and preparing them (their UTF-8, the separators' cores, the encoder's
// pieces) costs more than coding a small grid. So the last call's are kept
// prepared, keyed by the objects themselves: the names' str objects in order
// (a list is compared item by item on every call) and the separators tuple.
// The cache holds them, and str and tuples of str are immutable: the same
// objects are the same text. Only calls with names given as exact str (or
// None) are cached; the GIL guards the cache, and a call keeps its entry
// alive (shared_ptr) while it runs without the GIL.

// Python's check that no name holds a separator (`sep.strip(" ") or sep` in name),
// with its message; names as str objects.
inline void check_names_hold_no_separator(const std::vector<PyObject*>& names, const std::array<std::string, 4>& seps) {
  static const char* what[4] = {"run", "row", "count", "end"};
  for (PyObject* name : names) {
    const std::string_view n = utf8(name);
    for (int i = 0; i < 4; ++i) {
      std::string_view core = seps[i];
      std::string_view stripped = core;
      while (!stripped.empty() && stripped.front() == ' ') stripped.remove_prefix(1);
      while (!stripped.empty() && stripped.back() == ' ') stripped.remove_suffix(1);
      if (!stripped.empty()) core = stripped;
      if (n.find(core) == std::string_view::npos) continue;
      Ref c(check(PyUnicode_DecodeUTF8(core.data(), static_cast<Py_ssize_t>(core.size()), "strict")));
      Ref msg(check(PyUnicode_FromFormat("label %R contains the %s separator %R: the text could not be decoded "
                                         "(rename the label, or pass escape=True)", name, what[i], c.p)));
      PyErr_SetObject(PyExc_ValueError, msg.p);
      throw PyError{};
    }
  }
}

// Items of a list or tuple of exact str (borrowed), or false.
inline bool str_items(PyObject* seq, std::vector<PyObject*>& out) {
  if (!items(seq, out)) return false;
  for (PyObject* n : out)
    if (!PyUnicode_CheckExact(n)) return false;
  return true;
}

// Names and separators as a call gave them (held), checked, and their text.
struct Prepared {
  std::vector<Ref> name_objs;        // the names' str objects (nv views their UTF-8)
  Ref seps_obj;                      // the separators' tuple
  bool names_given = true;           // (decode: names=None takes the labels found)
  std::vector<std::string_view> nv;  // the names' UTF-8
  std::array<std::string, 4> seps;   // run, row, count, end

  Prepared(const std::vector<PyObject*>& names, PyObject* separators_obj, bool given)
      : seps_obj(Py_NewRef(separators_obj)), names_given(given), seps(separators(separators_obj)) {
    for (PyObject* n : names) {
      name_objs.emplace_back(Py_NewRef(n));
      nv.push_back(utf8(n));
    }
  }
  bool same(const std::vector<PyObject*>& names, PyObject* separators_obj, bool given) const {
    if (separators_obj != seps_obj.p || given != names_given || names.size() != name_objs.size()) return false;
    for (size_t i = 0; i < names.size(); ++i)
      if (names[i] != name_objs[i].p) return false;
    return true;
  }
};

// The last call's prepared names and separators of each codec (never freed:
// their references must not be dropped after the interpreter is gone).
template <class P>
std::shared_ptr<P>& last_prepared() {
  static auto* last = new std::shared_ptr<P>();
  return *last;
}

struct EncodePrepared : Prepared {
  std::array<std::unique_ptr<GridEncoder>, 3> encoders;  // per form, made when first asked for

  EncodePrepared(const std::vector<PyObject*>& names, PyObject* separators_obj)
      : Prepared(names, separators_obj, true) {
    check_names_hold_no_separator(names, seps);
    check_separators("rrle_encode", seps[0], seps[1], seps[2]);
  }
  const GridEncoder& encoder(int64_t form) {
    if (!encoders[form]) encoders[form] = std::make_unique<GridEncoder>(nv, seps[0], seps[1], seps[2], seps[3], form);
    return *encoders[form];
  }
};

// rrle_encode(labels, names, separators, form) -> str ((h, w) labels) or list of
// str ((B, h, w)); NotImplemented unless labels is a CPU int64 tensor read in
// place and names a list or tuple of str.
inline PyObject* rrle_encode(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const char* op = "rrle_encode";
  try {
    if (nargs != 4) {
      PyErr_SetString(PyExc_TypeError, "rrle_encode(labels, names, separators, form)");
      return nullptr;
    }
    if (!PyList_Check(args[1]) && !PyTuple_Check(args[1])) Py_RETURN_NOTIMPLEMENTED;
    const TensorView L = int64_tensor(args[0]);  // (first: reading it may run Python code)
    if (!L.ok || (L.dim != 2 && L.dim != 3)) Py_RETURN_NOTIMPLEMENTED;
    std::vector<PyObject*> names;
    std::shared_ptr<EncodePrepared>& last = last_prepared<EncodePrepared>();
    std::shared_ptr<EncodePrepared> prep = last;
    if (!str_items(args[1], names)) Py_RETURN_NOTIMPLEMENTED;
    if (!prep || !prep->same(names, args[2], true)) last = prep = std::make_shared<EncodePrepared>(names, args[2]);
    const int64_t form = as_int(args[3], "form");
    FV_CHECK(form >= 0 && form <= 2, op, "form must be 0 (row-wise runs), 1 (image-wise runs) or 2 (one label per "
             "patch); got ", form);
    const bool batch = L.dim == 3;
    const int64_t B = batch ? L.shape[0] : 1, h = L.shape[batch], w = L.shape[batch + 1];
    check_label_ids(op, L.data, B * h * w, h, w, static_cast<int64_t>(prep->nv.size()));
    const GridEncoder& encoder = prep->encoder(form);
    if (!batch) {
      static auto* buf = new std::string;  // (the GIL is held; its capacity serves the next call)
      const size_t n = encoder.encode(L.data, h, w, *buf);
      return PyUnicode_DecodeUTF8(buf->data(), static_cast<Py_ssize_t>(n), "strict");
    }
    std::vector<std::string> texts(static_cast<size_t>(B));
    {
      NoGil nogil;  // prep holds the names; labels: the caller's tensor
      parallel_for(op, 0, B, 16, [&](int64_t lo, int64_t hi) {
        std::string buf;
        for (int64_t b = lo; b < hi; ++b) {
          const size_t n = encoder.encode(L.data + b * h * w, h, w, buf);
          texts[b].assign(buf.data(), n);
        }
      });
    }
    Ref out(check(PyList_New(B)));
    for (int64_t b = 0; b < B; ++b)
      if (PyList_SetItem(out.p, b, check(PyUnicode_DecodeUTF8(texts[b].data(),
                                                              static_cast<Py_ssize_t>(texts[b].size()), "strict"))))
        throw PyError{};
    return out.release();
  } catch (...) {
    return set_error();
  }
}

struct DecodePrepared : Prepared {
  Seps seps_of_text;

  DecodePrepared(const std::vector<PyObject*>& names, PyObject* separators_obj, bool given)
      : Prepared(names, separators_obj, given), seps_of_text(seps[0], seps[1], seps[2], seps[3]) {
    if (given && nv.empty())
      throw std::invalid_argument("names must not be empty (pass None to take the labels found)");
    bool distinct = true;
    if (nv.size() <= 32) {
      for (size_t i = 0; i < nv.size() && distinct; ++i)
        for (size_t j = 0; j < i && distinct; ++j) distinct = nv[i] != nv[j];
    } else {
      std::unordered_map<std::string_view, int> seen;
      for (std::string_view n : nv) distinct = distinct && seen.emplace(n, 0).second;
    }
    if (!distinct) {
      Ref list(check(PyList_New(0)));
      for (const Ref& n : name_objs)
        if (PyList_Append(list.p, n.p)) throw PyError{};
      PyErr_Format(PyExc_ValueError, "names must be distinct; got %R", list.p);
      throw PyError{};
    }
    check_separators("rrle_decode", seps[0], seps[1], seps[2]);
  }
};

// rrle_decode(text, h, w, names, background, separators, strict, form) ->
// (labels, names, extra, repairs): labels an int64 tensor of the label ids,
// (h, w) for a str, (B, h, w) for a list of str; names the known names (None:
// the labels found) as a list of str; extra the labels found beyond the known
// names (ids len(names) + i in labels) and repairs ((text, kind, row, column,
// occurrences), ...) as tuples. Names are str()-ed, must be distinct and
// non-empty, and background must index them (messages as the Python API's);
// background fills what nothing was decoded to fill (the op's `fill`).
inline PyObject* rrle_decode(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const char* op = "rrle_decode";
  try {
    if (nargs != 8) {
      PyErr_SetString(PyExc_TypeError, "rrle_decode(text, h, w, names, background, separators, strict, form)");
      return nullptr;
    }
    const bool batch = !PyUnicode_Check(args[0]);
    std::vector<Ref> held;  // a batch's texts stay alive while the GIL is released
    std::vector<std::string_view> tv;
    std::string_view one;  // (one text: no vector until decode_batch needs one)
    if (batch) {
      std::vector<PyObject*> texts;
      if (!items(args[0], texts)) return type_error("text must be a str (or a list of str)", args[0]);
      for (PyObject* t : texts) {
        if (!PyUnicode_Check(t)) return type_error("text must be a str (or a list of str)", t);
        held.emplace_back(Py_NewRef(t));
        tv.push_back(utf8(t));
      }
    } else {
      one = utf8(args[0]);
    }
    const int64_t h = as_int(args[1], "h"), w = as_int(args[2], "w");
    const int64_t background = as_int(args[4], "background");
    const int strict = PyObject_IsTrue(args[6]);
    if (strict < 0) return nullptr;
    const int64_t form = as_int(args[7], "form");
    // The names as exact str (cached), or str()-ed into a list of this call's.
    const bool given = args[3] != Py_None;
    std::vector<PyObject*> names;
    Ref str_names;
    const bool cacheable = !given || str_items(args[3], names);
    if (!cacheable) {
      std::vector<PyObject*> objs;
      Ref list(check(PySequence_List(args[3])));  // our references: str() below runs the caller's code
      items(list.p, objs);
      str_names = Ref(check(PyList_New(static_cast<Py_ssize_t>(objs.size()))));
      for (size_t i = 0; i < objs.size(); ++i)
        PyList_SetItem(str_names.p, static_cast<Py_ssize_t>(i), check(PyObject_Str(objs[i])));
      items(str_names.p, names);
    }
    std::shared_ptr<DecodePrepared>& last = last_prepared<DecodePrepared>();
    std::shared_ptr<DecodePrepared> prep = cacheable ? last : nullptr;
    if (!prep || !prep->same(names, args[5], given)) {
      prep = std::make_shared<DecodePrepared>(names, args[5], given);
      if (cacheable) last = prep;
    }
    const std::vector<std::string_view>& nv = prep->nv;
    if (given && (background < 0 || background >= static_cast<int64_t>(nv.size()))) {
      PyErr_Format(PyExc_ValueError, "background must index names (0..%zd); got %lld",
                   static_cast<Py_ssize_t>(nv.size()) - 1, static_cast<long long>(background));
      return nullptr;
    }
    check_decode_ints(op, h, w, form, background);
    const int64_t B = batch ? static_cast<int64_t>(tv.size()) : 1;
    int64_t total = 0;
    FV_CHECK(mul_fits(B, h * w, &total), op, "B * h * w overflows int64");
    int64_t bytes = 0;
    FV_CHECK(mul_fits(total, 8, &bytes), op, "B * h * w overflows int64");
    NewInt64Tensor grid = batch ? NewInt64Tensor({B, h, w}) : NewInt64Tensor({h, w});
    int64_t* g = grid.data();
    const size_t K = nv.size();
    // One exact text (the common call): decoded here, without decode_batch's
    // tables; its ids are the names' (the decoder's table seeded with them)
    // unless it holds other labels, which decode_batch maps.
    DecodedBatch found;
    bool decoded = false;
    if (B == 1 && form <= 0 && K <= static_cast<size_t>(LabelTable::kScan) &&
        exact_path_enabled.load(std::memory_order_relaxed)) {
      Decoder d;  // (the call's own: creating Python objects may run finalizers, which may call this)
      d.table.labels.reserve(K + 4);
      for (std::string_view name : nv) d.table.id(name);
      d.text = batch ? tv[0] : one;
      d.seps = &prep->seps_of_text;
      d.strict = strict;
      decoded = d.decode_exact(h, w, g) && (!given || d.table.labels.size() == K);
      if (decoded) found.labels = std::move(d.table.labels);  // (views into the names and the text)
    }
    if (!decoded && !batch) {
      tv.push_back(one);
      found = decode_batch(op, tv, h, w, prep->seps_of_text, strict, form, background, nv, g);
    } else if (!decoded) {
      NoGil nogil;  // prep holds the names, `held` the texts
      found = decode_batch(op, tv, h, w, prep->seps_of_text, strict, form, background, nv, g);
    }
    auto str = [](std::string_view s) {
      return check(PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace"));
    };
    Ref out_names(check(PyList_New(static_cast<Py_ssize_t>(given ? K : found.labels.size()))));
    for (size_t i = 0; i < (given ? K : found.labels.size()); ++i)
      PyList_SetItem(out_names.p, static_cast<Py_ssize_t>(i),
                     given ? Py_NewRef(prep->name_objs[i].p) : str(found.labels[i]));
    // extra and repairs as tuples (the empty tuple is shared: the common case allocates nothing)
    const size_t first_extra = given ? K : found.labels.size();
    Ref extra(check(PyTuple_New(static_cast<Py_ssize_t>(found.labels.size() - first_extra))));
    for (size_t i = first_extra; i < found.labels.size(); ++i)
      PyTuple_SetItem(extra.p, static_cast<Py_ssize_t>(i - first_extra), str(found.labels[i]));
    Ref repairs(check(PyTuple_New(static_cast<Py_ssize_t>(found.repairs.size()))));
    for (size_t i = 0; i < found.repairs.size(); ++i) {
      const auto& r = found.repairs[i];
      PyTuple_SetItem(repairs.p, static_cast<Py_ssize_t>(i),
                      check(Py_BuildValue("(LLLLL)", r[0], r[1], r[2], r[3], r[4])));
    }
    Ref labels(grid.to_torch());
    return check(PyTuple_Pack(4, labels.p, out_names.p, extra.p, repairs.p));
  } catch (...) {
    return set_error();
  }
}

// _dlpack_exchange(enabled) / _rrle_exact_path(enabled) -> the previous
// setting: tests take the paths torch without DLPack's exchange API takes, and
// compare the decoder's two paths.
template <std::atomic<bool>& flag>
PyObject* set_flag(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  return PyBool_FromLong(flag.exchange(on != 0));
}

inline PyMethodDef kMethods[] = {
    {"rle_iou_coco", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rle_iou_coco)), METH_FASTCALL,
     "IoU of pycocotools RLE dicts (compressed counts): bytearray of (D, G) float64, or None"},
    {"rrle_encode", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rrle_encode)), METH_FASTCALL,
     "R-RLE text(s) of a CPU int64 label tensor (h, w) or (B, h, w), or NotImplemented"},
    {"rrle_decode", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rrle_decode)), METH_FASTCALL,
     "R-RLE text (or list of texts) -> (labels, names, extra labels, repairs)"},
    {"_dlpack_exchange", &set_flag<dlpack_exchange_enabled>, METH_O,
     "_dlpack_exchange(enabled) -> previous: whether tensors are read and made through DLPack's C exchange API "
     "(else through their attributes, a capsule and torch._C._from_dlpack)"},
    {"_rrle_exact_path", &set_flag<exact_path_enabled>, METH_O,
     "_rrle_exact_path(enabled) -> previous: whether R-RLE decoding tries its one-pass path for exact texts"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fastvision::masks::py

// fastvision._C's functions (registration.cpp's module definition).
PyMethodDef* fastvision_python_methods() { return fastvision::masks::py::kMethods; }
