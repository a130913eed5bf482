// pdserve._core.BlockIds (block_ids.h): the sequence and buffer protocols, equality with lists and
// tuples of ints (so results compare with the reference model's lists), the hash of the equal
// tuple, and pickling. Items become Python ints only when read (the shared ints of convert.h).
#include "block_ids.h"

#include <Python.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "convert.h"

namespace pdserve::bindings {

PyTypeObject BlockIdsType = {PyVarObject_HEAD_INIT(nullptr, 0)};

namespace {

PyTypeObject BlockIdsIterType = {PyVarObject_HEAD_INIT(nullptr, 0)};
PyObject* empty_ids = nullptr;  // the shared empty BlockIds, created at module init, never freed
Py_ssize_t item_size = sizeof(int32_t);  // strides of every exported buffer

BlockIdsObject* as_ids(PyObject* o) { return reinterpret_cast<BlockIdsObject*>(o); }

PyObject* new_ref(PyObject* o) {
  Py_INCREF(o);
  return o;
}

// An uninitialised BlockIds of n ids (n > 0): the caller fills ids before handing it out.
BlockIdsObject* alloc_ids(Py_ssize_t n) {
  return PyObject_NewVar(BlockIdsObject, &BlockIdsType, n);
}

// Runs body() and turns C++ exceptions (pybind11 conversion errors) into Python exceptions.
template <typename F>
PyObject* guarded(F&& body) {
  try {
    return body();
  } catch (...) {
    py::detail::try_translate_exceptions();
    return nullptr;
  }
}

void ids_dealloc(PyObject* self) { PyObject_Free(self); }

Py_ssize_t ids_length(PyObject* self) { return Py_SIZE(self); }

PyObject* ids_item(PyObject* self, Py_ssize_t i) {
  if (i < 0 || i >= Py_SIZE(self)) {
    PyErr_Format(PyExc_IndexError, "BlockIds index %zd out of range for %zd ids", i, Py_SIZE(self));
    return nullptr;
  }
  return small_int(as_ids(self)->ids[i]);
}

PyObject* ids_subscript(PyObject* self, PyObject* key) {
  const Py_ssize_t n = Py_SIZE(self);
  if (PyIndex_Check(key)) {
    Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return nullptr;
    if (i < 0) i += n;
    return ids_item(self, i);
  }
  if (PySlice_Check(key)) {
    Py_ssize_t start, stop, step;
    if (PySlice_Unpack(key, &start, &stop, &step) < 0) return nullptr;
    const Py_ssize_t len = PySlice_AdjustIndices(n, &start, &stop, step);
    if (step == 1) {
      if (len == n) return new_ref(self);  // immutable: a whole slice is the object itself
      return block_ids_from(as_ids(self)->ids + start, len);
    }
    if (len == 0) return new_ref(empty_ids);
    BlockIdsObject* out = alloc_ids(len);
    if (out == nullptr) return nullptr;
    for (Py_ssize_t i = 0; i < len; ++i) out->ids[i] = as_ids(self)->ids[start + i * step];
    return reinterpret_cast<PyObject*>(out);
  }
  PyErr_Format(PyExc_TypeError, "BlockIds indices must be integers or slices, not %.200s",
               Py_TYPE(key)->tp_name);
  return nullptr;
}

// 1 when value (any object) equals ids[i] as Python compares ints, 0 when not, -1 on error.
int item_equals(int32_t id, PyObject* value) {
  long long v;
  if (compact_int_value(value, &v)) return v == id;
  PyObject* item = small_int(id);
  if (item == nullptr) return -1;
  Py_INCREF(value);  // value may be a list item that the comparison's Python code drops
  const int eq = PyObject_RichCompareBool(item, value, Py_EQ);
  Py_DECREF(value);
  Py_DECREF(item);
  return eq;
}

// Position of the first id in [start, stop) equal to value, -1 if none, -2 on error.
Py_ssize_t find(PyObject* self, PyObject* value, Py_ssize_t start, Py_ssize_t stop) {
  const int32_t* ids = as_ids(self)->ids;
  long long v;
  if (compact_int_value(value, &v)) {
    if (v < INT32_MIN || v > INT32_MAX) return -1;
    const int32_t* hit = std::find(ids + start, ids + stop, static_cast<int32_t>(v));
    return hit == ids + stop ? -1 : hit - ids;
  }
  for (Py_ssize_t i = start; i < stop; ++i) {
    const int eq = item_equals(ids[i], value);
    if (eq < 0) return -2;
    if (eq) return i;
  }
  return -1;
}

int ids_contains(PyObject* self, PyObject* value) {
  const Py_ssize_t i = find(self, value, 0, Py_SIZE(self));
  return i == -2 ? -1 : i >= 0;
}

// Ints of any accepted input (BlockIds, list, tuple, numpy array, other iterable) into out.
// Raises TypeError / ValueError naming `name` and the bad element.
void read_ints(PyObject* obj, const char* name, std::vector<int32_t>* buffer, Int32View* view) {
  py::object as_list;
  if (!is_block_ids(obj) && !PyList_Check(obj) && !PyTuple_Check(obj) &&
      !PyObject_CheckBuffer(obj)) {
    if (Py_TYPE(obj)->tp_iter == nullptr && !PySequence_Check(obj)) {
      throw py::type_error(std::string(name) + " must be an iterable of ints, got " +
                           Py_TYPE(obj)->tp_name);
    }
    as_list = py::reinterpret_steal<py::object>(PySequence_List(obj));
    if (!as_list) throw py::error_already_set();
    obj = as_list.ptr();
  }
  to_int32(obj, name, buffer, view);
}

PyObject* ids_concat(PyObject* self, PyObject* other) {
  return guarded([&]() -> PyObject* {
    std::vector<int32_t> buffer;
    Int32View view;
    read_ints(other, "BlockIds + other: other", &buffer, &view);
    const Py_ssize_t n = Py_SIZE(self);
    const Py_ssize_t m = static_cast<Py_ssize_t>(view.size);
    if (m == 0) return new_ref(self);
    if (n == 0 && is_block_ids(other)) return new_ref(other);
    BlockIdsObject* out = alloc_ids(n + m);
    if (out == nullptr) return nullptr;
    std::memcpy(out->ids, as_ids(self)->ids, n * sizeof(int32_t));
    std::memcpy(out->ids + n, view.data, m * sizeof(int32_t));
    return reinterpret_cast<PyObject*>(out);
  });
}

// Elementwise equality with BlockIds, lists and tuples (1 / 0), -1 on error, 2 for other types.
int equals(PyObject* self, PyObject* other) {
  const Py_ssize_t n = Py_SIZE(self);
  const int32_t* ids = as_ids(self)->ids;
  if (is_block_ids(other)) {
    return n == Py_SIZE(other) && std::memcmp(ids, block_ids_data(other), n * sizeof(int32_t)) == 0;
  }
  if (!PyList_Check(other) && !PyTuple_Check(other)) return 2;
  // A list can change length while a Python-level __eq__ of an element runs: re-read the size.
  for (Py_ssize_t i = 0;; ++i) {
    const Py_ssize_t size = PySequence_Fast_GET_SIZE(other);
    if (size != n) return 0;
    if (i == n) return 1;
    const int eq = item_equals(ids[i], PySequence_Fast_ITEMS(other)[i]);
    if (eq <= 0) return eq;
  }
}

PyObject* ids_richcompare(PyObject* self, PyObject* other, int op) {
  if (op != Py_EQ && op != Py_NE) Py_RETURN_NOTIMPLEMENTED;
  const int eq = equals(self, other);
  if (eq < 0) return nullptr;
  if (eq == 2) Py_RETURN_NOTIMPLEMENTED;
  return PyBool_FromLong((op == Py_EQ) == (eq == 1));
}

// The hash of tuple(self) (CPython's tuple hash, xxHash-based since 3.8), so that a BlockIds and
// the tuple it equals hash alike. hash(int) is the int itself, except hash(-1) == -2.
Py_hash_t ids_hash(PyObject* self) {
#if SIZEOF_PY_UHASH_T > 4
  constexpr Py_uhash_t kPrime1 = 11400714785074694791ULL;
  constexpr Py_uhash_t kPrime2 = 14029467366897019727ULL;
  constexpr Py_uhash_t kPrime5 = 2870177450012600261ULL;
  auto rotate = [](Py_uhash_t x) { return (x << 31) | (x >> 33); };
#else
  constexpr Py_uhash_t kPrime1 = 2654435761UL;
  constexpr Py_uhash_t kPrime2 = 2246822519UL;
  constexpr Py_uhash_t kPrime5 = 374761393UL;
  auto rotate = [](Py_uhash_t x) { return (x << 13) | (x >> 19); };
#endif
  const Py_ssize_t n = Py_SIZE(self);
  Py_uhash_t acc = kPrime5;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const int32_t id = as_ids(self)->ids[i];
    const Py_uhash_t lane = static_cast<Py_uhash_t>(static_cast<Py_hash_t>(id == -1 ? -2 : id));
    acc += lane * kPrime2;
    acc = rotate(acc);
    acc *= kPrime1;
  }
  acc += static_cast<Py_uhash_t>(n) ^ (kPrime5 ^ 3527539UL);
  if (acc == static_cast<Py_uhash_t>(-1)) return 1546275796;
  return static_cast<Py_hash_t>(acc);
}

PyObject* ids_repr(PyObject* self) {
  std::string out = "BlockIds([";
  for (Py_ssize_t i = 0; i < Py_SIZE(self); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(as_ids(self)->ids[i]);
  }
  out += "])";
  return PyUnicode_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

// Read-only, 1-D, format "i" (native int32), contiguous; the buffer keeps the object alive.
int ids_getbuffer(PyObject* self, Py_buffer* view, int flags) {
  if ((flags & PyBUF_WRITABLE) == PyBUF_WRITABLE) {
    PyErr_SetString(PyExc_BufferError, "BlockIds is immutable: its buffer is read-only");
    view->obj = nullptr;
    return -1;
  }
  view->buf = as_ids(self)->ids;
  view->obj = new_ref(self);
  view->len = Py_SIZE(self) * static_cast<Py_ssize_t>(sizeof(int32_t));
  view->readonly = 1;
  view->itemsize = sizeof(int32_t);
  view->format = (flags & PyBUF_FORMAT) == PyBUF_FORMAT ? const_cast<char*>("i") : nullptr;
  view->ndim = 1;
  view->shape =
      (flags & PyBUF_ND) == PyBUF_ND ? &reinterpret_cast<PyVarObject*>(self)->ob_size : nullptr;
  view->strides = (flags & PyBUF_STRIDES) == PyBUF_STRIDES ? &item_size : nullptr;
  view->suboffsets = nullptr;
  view->internal = nullptr;
  return 0;
}

PyObject* ids_tolist(PyObject* self, PyObject*) {
  return new_int_list(as_ids(self)->ids, static_cast<size_t>(Py_SIZE(self)));
}

PyObject* ids_reduce(PyObject* self, PyObject*) {
  PyObject* list = ids_tolist(self, nullptr);
  if (list == nullptr) return nullptr;
  return Py_BuildValue("O(N)", reinterpret_cast<PyObject*>(&BlockIdsType), list);
}

PyObject* ids_self(PyObject* self, PyObject*) { return new_ref(self); }

PyObject* ids_count(PyObject* self, PyObject* value) {
  Py_ssize_t count = 0;
  for (Py_ssize_t start = 0; start < Py_SIZE(self); ++start) {
    start = find(self, value, start, Py_SIZE(self));
    if (start == -2) return nullptr;
    if (start == -1) break;
    ++count;
  }
  return PyLong_FromSsize_t(count);
}

PyObject* ids_index(PyObject* self, PyObject* args) {
  PyObject* value;
  Py_ssize_t start = 0, stop = PY_SSIZE_T_MAX;
  if (!PyArg_ParseTuple(args, "O|nn:index", &value, &start, &stop)) return nullptr;
  const Py_ssize_t n = Py_SIZE(self);
  if (start < 0) start = std::max<Py_ssize_t>(start + n, 0);
  if (stop < 0) stop += n;
  stop = std::min(stop, n);
  const Py_ssize_t i = start < stop ? find(self, value, start, stop) : -1;
  if (i == -2) return nullptr;
  if (i == -1) {
    PyObject* r = PyObject_Repr(value);
    if (r == nullptr) return nullptr;
    PyErr_Format(PyExc_ValueError, "BlockIds.index(%U): not in the ids", r);
    Py_DECREF(r);
    return nullptr;
  }
  return PyLong_FromSsize_t(i);
}

PyObject* ids_new(PyTypeObject*, PyObject* args, PyObject* kwargs) {
  PyObject* ids = nullptr;
  static const char* kKeywords[] = {"ids", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:BlockIds", const_cast<char**>(kKeywords),
                                   &ids)) {
    return nullptr;
  }
  if (ids == nullptr) return new_ref(empty_ids);
  if (is_block_ids(ids)) return new_ref(ids);  // immutable: no copy needed
  return guarded([&] {
    std::vector<int32_t> buffer;
    Int32View view;
    read_ints(ids, "BlockIds(ids): ids", &buffer, &view);
    return block_ids_from(view.data, static_cast<Py_ssize_t>(view.size));
  });
}

// ---- iterator: creates each int as it is read ---------------------------------------------------
struct IterObject {
  PyObject_HEAD PyObject* seq;  // the BlockIds; nullptr once exhausted
  Py_ssize_t index;
};

PyObject* ids_iter(PyObject* self) {
  IterObject* it = PyObject_New(IterObject, &BlockIdsIterType);
  if (it == nullptr) return nullptr;
  it->seq = new_ref(self);
  it->index = 0;
  return reinterpret_cast<PyObject*>(it);
}

void iter_dealloc(PyObject* self) {
  Py_XDECREF(reinterpret_cast<IterObject*>(self)->seq);
  PyObject_Free(self);
}

PyObject* iter_next(PyObject* self) {
  auto* it = reinterpret_cast<IterObject*>(self);
  if (it->seq == nullptr) return nullptr;
  if (it->index < Py_SIZE(it->seq)) return small_int(as_ids(it->seq)->ids[it->index++]);
  Py_CLEAR(it->seq);
  return nullptr;
}

PyObject* iter_length_hint(PyObject* self, PyObject*) {
  auto* it = reinterpret_cast<IterObject*>(self);
  return PyLong_FromSsize_t(it->seq == nullptr ? 0 : Py_SIZE(it->seq) - it->index);
}

PyMethodDef kIterMethods[] = {
    {"__length_hint__", iter_length_hint, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

PySequenceMethods kSequence = {};
PyMappingMethods kMapping = {};
PyBufferProcs kBuffer = {};
PyMethodDef kMethods[] = {
    {"tolist", ids_tolist, METH_NOARGS, "tolist() -> list[int]: the ids as a new list."},
    {"count", ids_count, METH_O, "count(value) -> int: how many ids equal value."},
    {"index", ids_index, METH_VARARGS,
     "index(value, start=0, stop=len) -> int: position of the first id equal to value; "
     "ValueError if none."},
    {"__reduce__", ids_reduce, METH_NOARGS, "Pickles as BlockIds(list of ints)."},
    {"__copy__", ids_self, METH_NOARGS, "Immutable: the object itself."},
    {"__deepcopy__", ids_self, METH_O, "Immutable: the object itself."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyObject* block_ids_from(const int32_t* data, Py_ssize_t n) {
  if (n == 0 && empty_ids != nullptr) return new_ref(empty_ids);
  BlockIdsObject* out = alloc_ids(n);
  if (out == nullptr) return nullptr;
  if (n > 0) std::memcpy(out->ids, data, static_cast<size_t>(n) * sizeof(int32_t));
  return reinterpret_cast<PyObject*>(out);
}

void add_block_ids_type(PyObject* module) {
  kSequence.sq_length = ids_length;
  kSequence.sq_concat = ids_concat;
  kSequence.sq_item = ids_item;
  kSequence.sq_contains = ids_contains;
  kMapping.mp_length = ids_length;
  kMapping.mp_subscript = ids_subscript;
  kBuffer.bf_getbuffer = ids_getbuffer;

  PyTypeObject& t = BlockIdsType;
  t.tp_name = "pdserve._core.BlockIds";
  t.tp_basicsize = offsetof(BlockIdsObject, ids);
  t.tp_itemsize = sizeof(int32_t);
  t.tp_dealloc = ids_dealloc;
  t.tp_repr = ids_repr;
  t.tp_as_sequence = &kSequence;
  t.tp_as_mapping = &kMapping;
  t.tp_as_buffer = &kBuffer;
  t.tp_hash = ids_hash;
  t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_SEQUENCE;
  t.tp_doc =
      "BlockIds(ids=())\n--\n\n"
      "Immutable sequence of int32 block ids (the cache core's block-id results). Indexing, "
      "slicing (a BlockIds), iteration, `in`, `+` (a BlockIds), == with lists and tuples of ints, "
      "hashable like the equal tuple, picklable; the buffer protocol (format 'i', read-only) lets "
      "numpy.asarray(ids) view it without a copy. tolist() gives a list.";
  t.tp_richcompare = ids_richcompare;
  t.tp_iter = ids_iter;
  t.tp_methods = kMethods;
  t.tp_new = ids_new;
  t.tp_free = PyObject_Free;

  PyTypeObject& it = BlockIdsIterType;
  it.tp_name = "pdserve._core.BlockIdsIterator";
  it.tp_basicsize = sizeof(IterObject);
  it.tp_dealloc = iter_dealloc;
  it.tp_flags = Py_TPFLAGS_DEFAULT;
  it.tp_iter = PyObject_SelfIter;
  it.tp_iternext = iter_next;
  it.tp_methods = kIterMethods;

  if (PyType_Ready(&t) < 0 || PyType_Ready(&it) < 0) throw py::error_already_set();
  if (empty_ids == nullptr) {
    empty_ids = reinterpret_cast<PyObject*>(alloc_ids(0));
    if (empty_ids == nullptr) throw py::error_already_set();
  }
  Py_INCREF(&t);
  if (PyModule_AddObject(module, "BlockIds", reinterpret_cast<PyObject*>(&t)) < 0) {
    Py_DECREF(&t);
    throw py::error_already_set();
  }
  py::module_::import("collections.abc")
      .attr("Sequence")
      .attr("register")(py::handle(reinterpret_cast<PyObject*>(&t)));
}

}  // namespace pdserve::bindings
