// Conversions shared by the cache-core bindings (core_module.cpp, fast_methods.cpp, block_ids.cpp):
// int32 views of BlockIds, Python lists and numpy arrays, BlockIds results, Python ints shared
// across calls, and the pdserve.cache.types result classes. Inline functions in a named
// namespace, so that the process-wide caches (block-id ints, result types) exist once across
// translation units.
#pragma once

#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <structmember.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "block_ids.h"
#include "pdserve/block_pool.h"
#include "pdserve/radix_tree.h"

namespace pdserve::bindings {
namespace py = pybind11;

// A read-only view of int32 values taken from a Python object. Contiguous int32 buffers are used in
// place (the buffer stays acquired until the view is destroyed, which happens with the GIL held);
// everything else is converted into `scratch`, a per-thread vector reused across calls.
struct Int32View {
  const int32_t* data = nullptr;
  size_t size = 0;
  Py_buffer buffer{};
  bool has_buffer = false;

  Int32View() = default;
  Int32View(const Int32View&) = delete;
  Int32View& operator=(const Int32View&) = delete;
  ~Int32View() {
    if (has_buffer) PyBuffer_Release(&buffer);
  }
};

[[noreturn]] inline void bad_value(const char* name, size_t index, long long value) {
  throw py::value_error(std::string(name) + "[" + std::to_string(index) +
                        "] = " + std::to_string(value) + " does not fit in int32");
}

template <typename T>
inline void copy_strided(const Py_buffer& buf, const char* name, std::vector<int32_t>* scratch) {
  const char* base = static_cast<const char*>(buf.buf);
  const Py_ssize_t n = buf.shape[0];
  const Py_ssize_t stride = buf.strides[0];
  scratch->resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    T v = *reinterpret_cast<const T*>(base + i * stride);
    if (v < INT32_MIN || v > INT32_MAX) bad_value(name, i, static_cast<long long>(v));
    (*scratch)[i] = static_cast<int32_t>(v);
  }
}

// Reads an exact int of one internal digit (|value| < 2**30: every token and block id) without a
// function call; false for anything else, which then takes the checked slow path.
inline bool compact_int_value(PyObject* o, long long* out) {
  if (!PyLong_CheckExact(o)) return false;
#if PY_VERSION_HEX >= 0x030C0000
  if (!PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(o))) return false;
  *out = PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(o));
  return true;
#else
  const Py_ssize_t size = Py_SIZE(o);
  if (size < -1 || size > 1) return false;
  *out = size * static_cast<long long>(reinterpret_cast<PyLongObject*>(o)->ob_digit[0]);
  return true;
#endif
}

// A 1-D, aligned, native-order numpy int32 array with unit stride is read in place through its
// struct fields: numpy's buffer export builds a format description on every call, which cost
// more than the tree walk it feeds. The caller's reference keeps the array alive, and numpy
// refuses to resize an array that more than one reference holds.
inline bool numpy_int32_view(PyObject* o, Int32View* view) {
  if (std::strcmp(Py_TYPE(o)->tp_name, "numpy.ndarray") != 0) return false;  // exact type only
  namespace pd = py::detail;
  static const pd::npy_api& api = pd::npy_api::get();  // numpy is imported: o is an ndarray
  if (!api.PyArray_Check_(o)) return false;
  const pd::PyArray_Proxy* a = pd::array_proxy(o);
  const pd::PyArrayDescr_Proxy* d = pd::array_descriptor_proxy(a->descr);
  const bool native =
      d->byteorder == '=' || d->byteorder == '|' || d->byteorder == (PY_LITTLE_ENDIAN ? '<' : '>');
  if (a->nd != 1 || d->type_num != pd::npy_api::NPY_INT32_ || !native ||
      (a->flags & pd::npy_api::NPY_ARRAY_ALIGNED_) == 0 ||
      (a->strides[0] != 4 && a->dimensions[0] > 1)) {
    return false;
  }
  view->data = reinterpret_cast<const int32_t*>(a->data);
  view->size = static_cast<size_t>(a->dimensions[0]);
  return true;
}

inline void to_int32(py::handle obj, const char* name, std::vector<int32_t>* scratch,
                     Int32View* view) {
  PyObject* o = obj.ptr();
  if (is_block_ids(o)) {  // immutable, kept alive by the caller's reference: read in place
    view->data = block_ids_data(o);
    view->size = static_cast<size_t>(Py_SIZE(o));
    return;
  }
  if (PyList_Check(o) || PyTuple_Check(o)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    PyObject** items = PySequence_Fast_ITEMS(o);
    scratch->resize(n);
    int32_t* dst = scratch->data();
    for (Py_ssize_t i = 0; i < n; ++i) {
      long long v;
      if (compact_int_value(items[i], &v)) {
        dst[i] = static_cast<int32_t>(v);
        continue;
      }
      int overflow = 0;
      v = PyLong_AsLongLongAndOverflow(items[i], &overflow);
      if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        throw py::type_error(std::string(name) + "[" + std::to_string(i) +
                             "] must be an int, got " + Py_TYPE(items[i])->tp_name);
      }
      if (overflow != 0 || v < INT32_MIN || v > INT32_MAX) {
        throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] = " +
                              py::repr(items[i]).cast<std::string>() + " does not fit in int32");
      }
      dst[i] = static_cast<int32_t>(v);
    }
    view->data = scratch->data();
    view->size = scratch->size();
    return;
  }
  if (numpy_int32_view(o, view)) return;
  if (PyObject_CheckBuffer(o)) {
    if (PyObject_GetBuffer(o, &view->buffer, PyBUF_STRIDES | PyBUF_FORMAT) != 0) {
      throw py::error_already_set();
    }
    view->has_buffer = true;
    const Py_buffer& buf = view->buffer;
    if (buf.ndim != 1) {
      throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(buf.ndim) +
                            " dimensions");
    }
    const char* format = buf.format == nullptr ? "B" : buf.format;
    if (format[0] == (PY_LITTLE_ENDIAN ? '>' : '<') || format[0] == '!') {
      throw py::type_error(std::string(name) +
                           " must be in native byte order, got buffer format '" + format + "'");
    }
    char kind = format[0] == '\0' ? '?' : format[std::strlen(format) - 1];
    bool is_signed_int = kind == 'b' || kind == 'h' || kind == 'i' || kind == 'l' || kind == 'q';
    if (!is_signed_int || (buf.itemsize != 4 && buf.itemsize != 8)) {
      throw py::type_error(std::string(name) +
                           " must hold int32 or int64 values, got buffer format '" + format +
                           "' of " + std::to_string(buf.itemsize) + " bytes");
    }
    if (buf.itemsize == 4 && (buf.strides[0] == 4 || buf.shape[0] <= 1)) {
      view->data = static_cast<const int32_t*>(buf.buf);
      view->size = static_cast<size_t>(buf.shape[0]);
    } else {
      if (buf.itemsize == 4) {
        copy_strided<int32_t>(buf, name, scratch);
      } else {
        copy_strided<int64_t>(buf, name, scratch);
      }
      view->data = scratch->data();
      view->size = scratch->size();
    }
    return;
  }
  if (PySequence_Check(o)) {  // any other sequence: slow path through a list
    to_int32(py::list(py::reinterpret_borrow<py::object>(obj)), name, scratch, view);
    return;
  }
  throw py::type_error(
      std::string(name) +
      " must be a BlockIds, a list of ints or a 1-D numpy int32/int64 array, got " +
      Py_TYPE(o)->tp_name);
}

inline std::vector<int32_t>& scratch(int slot) {
  thread_local std::vector<int32_t> buffers[2];
  return buffers[slot];
}

// Python ints for block ids, created once and shared (ints are immutable): reading a BlockIds item
// or turning hundreds of ids into a list then costs one reference increment per id. BlockPool's
// constructor creates them in id order, so neighbouring ids share cache lines.
constexpr long long kMaxCachedInt = 1 << 20;
inline std::vector<PyObject*>& int_cache() {
  static auto* cache = new std::vector<PyObject*>();  // only touched with the GIL held; leaked
  return *cache;
}

inline void prefill_int_cache(long long count) {
  std::vector<PyObject*>& cache = int_cache();
  count = std::min(count, kMaxCachedInt);
  if (count <= static_cast<long long>(cache.size())) return;
  size_t old = cache.size();
  cache.resize(static_cast<size_t>(count), nullptr);
  for (size_t i = old; i < cache.size(); ++i) {
    cache[i] = PyLong_FromLongLong(static_cast<long long>(i));
    if (cache[i] == nullptr) throw py::error_already_set();
  }
}

inline PyObject* small_int(long long value) {
  std::vector<PyObject*>& cache = int_cache();
  if (value < 0 || value >= static_cast<long long>(cache.size())) {
    return PyLong_FromLongLong(value);
  }
  PyObject* item = cache[static_cast<size_t>(value)];
  Py_INCREF(item);
  return item;
}

// A new list of the ints values[0, n) (shared int objects where cached); nullptr with a Python
// error set on failure. Used by BlockIds.tolist() and the token ids of cache events.
inline PyObject* new_int_list(const int32_t* values, size_t n) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(n));
  if (list == nullptr) return nullptr;
  const std::vector<PyObject*>& cache = int_cache();
  const long long num_cached = static_cast<long long>(cache.size());
  PyObject** items = reinterpret_cast<PyListObject*>(list)->ob_item;
  // The shared ints of ids the caller has not touched lately are often out of cache: their
  // reference counts are fetched a few items ahead so that the misses overlap.
  constexpr size_t kAhead = 8;
  for (size_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      const long long ahead = values[i + kAhead];
      if (ahead >= 0 && ahead < num_cached) __builtin_prefetch(cache[ahead], 1);
    }
    const long long value = values[i];
    PyObject* item;
    if (value >= 0 && value < num_cached) {
      item = cache[value];
      Py_INCREF(item);
    } else {
      item = PyLong_FromLongLong(value);
      if (item == nullptr) {
        Py_DECREF(list);
        return nullptr;
      }
    }
    items[i] = item;
  }
  return list;
}

inline py::list to_list(const std::vector<int32_t>& values) {
  PyObject* list = new_int_list(values.data(), values.size());
  if (list == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::list>(list);
}

// Block ids (or tiers: an int32 enum) as a new BlockIds, one allocation and one copy.
template <typename T>
inline py::object to_block_ids(const std::vector<T>& values) {
  static_assert(sizeof(T) == sizeof(int32_t), "BlockIds holds int32 values");
  PyObject* out = block_ids_from(reinterpret_cast<const int32_t*>(values.data()),
                                 static_cast<Py_ssize_t>(values.size()));
  if (out == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(out);
}

inline py::list u64_list(const std::vector<uint64_t>& values) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(values.size()));
  if (list == nullptr) throw py::error_already_set();
  for (size_t i = 0; i < values.size(); ++i) {
    PyList_SET_ITEM(list, i, PyLong_FromUnsignedLongLong(values[i]));
  }
  return py::reinterpret_steal<py::list>(list);
}

// Accepts 0 / 1 or a pdserve.cache.Tier (an IntEnum) without going through Python-level __index__.
inline Tier to_tier(py::handle obj) {
  long tier = -1;
  if (PyLong_Check(obj.ptr())) {
    tier = PyLong_AsLong(obj.ptr());
    if (tier == -1 && PyErr_Occurred()) throw py::error_already_set();
  } else {
    throw py::type_error(std::string("tier must be a Tier or an int, got ") +
                         Py_TYPE(obj.ptr())->tp_name);
  }
  if (tier != 0 && tier != 1) {
    throw py::value_error("tier must be 0 (GPU) or 1 (HOST), got " + std::to_string(tier));
  }
  return static_cast<Tier>(tier);
}

// Builds instances of a slots dataclass without running its Python-level __init__ (a frame per
// result): the instance is allocated by the type and its slots filled in field order. Only used
// when the class is plain (no __post_init__, every field a slot of its own); otherwise calls it.
class SlotsMaker {
 public:
  SlotsMaker() = default;
  explicit SlotsMaker(py::object cls) : cls_(std::move(cls)) {
    py::object fields = py::module_::import("dataclasses").attr("fields")(cls_);
    if (py::hasattr(cls_, "__post_init__")) return;
    auto* type = reinterpret_cast<PyTypeObject*>(cls_.ptr());
    py::object own_attrs = cls_.attr("__dict__");
    for (py::handle f : fields) {
      py::object name = f.attr("name");
      if (!own_attrs.contains(name)) return;  // a slot of a base class: keep calling the class
      py::object descr = own_attrs[name];
      if (Py_TYPE(descr.ptr()) != &PyMemberDescr_Type) return;
      const PyMemberDef* m = reinterpret_cast<PyMemberDescrObject*>(descr.ptr())->d_member;
      if (m->type != T_OBJECT_EX || (m->flags & READONLY) != 0) return;
      offsets_.push_back(m->offset);
    }
    direct_ = type->tp_alloc != nullptr && !offsets_.empty();
  }

  // cls(*args), taking the arguments (passed by value).
  template <size_t N>
  py::object operator()(std::array<py::object, N> args) const {
    PyObject* out;
    if (direct_ && offsets_.size() == N) {
      auto* type = reinterpret_cast<PyTypeObject*>(cls_.ptr());
      out = type->tp_alloc(type, 0);
      if (out == nullptr) throw py::error_already_set();
      for (size_t i = 0; i < N; ++i) {
        *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(out) + offsets_[i]) =
            args[i].release().ptr();
      }
    } else {
      PyObject* raw[N];
      for (size_t i = 0; i < N; ++i) raw[i] = args[i].ptr();
      out = PyObject_Vectorcall(cls_.ptr(), raw, N, nullptr);
      if (out == nullptr) throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(out);
  }

 private:
  py::object cls_;
  std::vector<Py_ssize_t> offsets_;
  bool direct_ = false;
};

// The result classes of pdserve.cache.types, looked up once (the module is imported by
// pdserve.cache before any of these calls can happen) and kept for the process lifetime.
struct ResultTypes {
  py::object match_result, insert_result, ticket, cache_event, eviction_plan;
  SlotsMaker make_match_result, make_insert_result;
  py::object tiers[2];
  py::object event_kinds[4];
  py::object ticket_kinds[2];
};

inline const ResultTypes& types() {
  static ResultTypes* cached = nullptr;  // leaked on purpose: outlives interpreter teardown order
  if (cached == nullptr) {
    py::module_ m = py::module_::import("pdserve.cache.types");
    auto* t = new ResultTypes();
    t->match_result = m.attr("MatchResult");
    t->insert_result = m.attr("InsertResult");
    t->ticket = m.attr("Ticket");
    t->cache_event = m.attr("CacheEvent");
    t->eviction_plan = m.attr("EvictionPlan");
    t->make_match_result = SlotsMaker(t->match_result);
    t->make_insert_result = SlotsMaker(t->insert_result);
    for (int i = 0; i < 2; ++i) t->tiers[i] = m.attr("Tier")(i);
    py::tuple event_kinds = m.attr("EVENT_KINDS");
    for (int i = 0; i < 4; ++i) t->event_kinds[i] = event_kinds[i];
    py::tuple ticket_kinds = m.attr("TICKET_KINDS");
    for (int i = 0; i < 2; ++i) t->ticket_kinds[i] = ticket_kinds[i];
    cached = t;
  }
  return *cached;
}

inline const py::object& tier_object(Tier tier) { return types().tiers[static_cast<int>(tier)]; }

// Calls cls(*args) through vectorcall (no argument tuple).
template <size_t N>
inline py::object construct(const py::object& cls, std::array<py::object, N> args) {
  PyObject* raw[N];
  for (size_t i = 0; i < N; ++i) raw[i] = args[i].ptr();
  PyObject* out = PyObject_Vectorcall(cls.ptr(), raw, N, nullptr);
  if (out == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(out);
}

inline py::object ticket_object(const Ticket& t) {
  const ResultTypes& ty = types();
  return construct<6>(ty.ticket, {py::int_(t.ticket_id), ty.ticket_kinds[static_cast<int>(t.kind)],
                                  tier_object(t.src_tier), tier_object(t.dst_tier),
                                  to_block_ids(t.src_block_ids), to_block_ids(t.dst_block_ids)});
}

}  // namespace pdserve::bindings
