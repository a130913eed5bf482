// The per-request methods of BlockPool and RadixTree as plain CPython METH_FASTCALL method
// descriptors installed on the pybind11 classes (see add_fast_methods below for why).
#include <Python.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "convert.h"
#include "pdserve/block_pool.h"
#include "pdserve/radix_tree.h"

namespace pdserve::bindings {
namespace {

// ---- Hot methods as METH_FASTCALL descriptors ---------------------------------------------------
// pybind11's generic dispatcher builds a bound method, argument vectors and type casters on every
// call (~100 ns), more than lock(), can_allocate() or decref() of a few ids take in C++. The
// per-request methods are therefore installed as plain CPython method descriptors (LOAD_METHOD
// calls them without a bound method) that read the C++ object out of the pybind11 instance. The
// descriptor checks that self is an instance of the class; errors are translated like pybind11.

// Positional / keyword binding of a fastcall's arguments to `names` (the first num_required are
// required). Raises TypeError like a Python function would.
template <size_t N>
void bind_args(const char* method, const std::array<const char*, N>& names, size_t num_required,
               PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, PyObject** out) {
  for (size_t i = 0; i < N; ++i) out[i] = nullptr;
  if (nargs > static_cast<Py_ssize_t>(N)) {
    throw py::type_error(std::string(method) + "() takes at most " + std::to_string(N) +
                         " arguments, got " + std::to_string(nargs));
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) out[i] = args[i];
  const Py_ssize_t num_kw = kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames);
  for (Py_ssize_t k = 0; k < num_kw; ++k) {
    PyObject* key = PyTuple_GET_ITEM(kwnames, k);
    size_t j = 0;
    while (j < N && PyUnicode_CompareWithASCIIString(key, names[j]) != 0) ++j;
    if (j == N || out[j] != nullptr) {
      throw py::type_error(std::string(method) + "() got an unexpected or repeated argument '" +
                           py::str(key).cast<std::string>() + "'");
    }
    out[j] = args[nargs + k];
  }
  for (size_t i = 0; i < num_required; ++i) {
    if (out[i] == nullptr) {
      throw py::type_error(std::string(method) + "() missing required argument '" + names[i] + "'");
    }
  }
}

// The C++ object behind a pybind11 instance of a class with one C++ base (simple layout).
template <typename T>
T& cpp_self(PyObject* self) {
  auto* inst = reinterpret_cast<py::detail::instance*>(self);
  py::detail::value_and_holder vh = inst->get_value_and_holder(nullptr, false);
  if (vh.inst == nullptr || !vh.holder_constructed() || vh.value_ptr() == nullptr) {
    throw py::type_error(std::string(Py_TYPE(self)->tp_name) + ".__init__() was not called");
  }
  return *static_cast<T*>(vh.value_ptr());
}

// Exact int (or subclass, e.g. IntEnum) to C int types, with the same messages as elsewhere.
long long int_arg(PyObject* o, const char* method, const char* name) {
  py::object index;  // anything with __index__ (numpy integers), like pybind11's int caster
  if (!PyLong_Check(o)) {
    if (Py_TYPE(o)->tp_as_number == nullptr || Py_TYPE(o)->tp_as_number->nb_index == nullptr) {
      throw py::type_error(std::string(method) + "(): " + name + " must be an int, got " +
                           Py_TYPE(o)->tp_name);
    }
    index = py::reinterpret_steal<py::object>(PyNumber_Index(o));
    if (!index) throw py::error_already_set();
    o = index.ptr();
  }
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0) {
    throw py::value_error(std::string(method) + "(): " + name + " out of range");
  }
  return v;
}

int32_t int32_arg(PyObject* o, const char* method, const char* name) {
  long long v = int_arg(o, method, name);
  if (v < INT32_MIN || v > INT32_MAX) {
    throw py::value_error(std::string(method) + "(): " + name + " = " + std::to_string(v) +
                          " does not fit in int32");
  }
  return static_cast<int32_t>(v);
}

uint64_t handle_arg(PyObject* o, const char* method, const char* name) {
  long long v = int_arg(o, method, name);
  if (v < 0) {
    throw py::value_error(std::string(method) + "(): " + name + " must be >= 0, got " +
                          std::to_string(v));
  }
  return static_cast<uint64_t>(v);
}

// Releases the GIL for a scope (cheaper than py::gil_scoped_release, which also consults
// pybind11's internals).
class NoGil {
 public:
  NoGil() : state_(PyEval_SaveThread()) {}
  ~NoGil() { PyEval_RestoreThread(state_); }
  NoGil(const NoGil&) = delete;
  NoGil& operator=(const NoGil&) = delete;

 private:
  PyThreadState* state_;
};

// Runs body() and turns C++ exceptions into the Python exceptions pybind11 would raise.
template <typename F>
PyObject* guarded(F&& body) {
  try {
    return body();
  } catch (...) {
    py::detail::try_translate_exceptions();
    return nullptr;
  }
}

PyObject* none() { Py_RETURN_NONE; }

PyObject* tree_match_prefix(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                            PyObject* kwnames) {
  return guarded([&] {
    PyObject* a[1];
    bind_args<1>("match_prefix", {"tokens"}, 1, args, nargs, kwnames, a);
    RadixTree& t = cpp_self<RadixTree>(self);
    thread_local MatchResult result;
    Int32View v;
    to_int32(a[0], "tokens", &scratch(0), &v);
    {
      NoGil nogil;
      t.match_prefix(v.data, v.size, &result);
    }
    return types()
        .make_match_result(
            std::array<py::object, 4>{py::int_(result.num_tokens), to_block_ids(result.block_ids),
                                      to_block_ids(result.tiers), py::int_(result.node)})
        .release()
        .ptr();
  });
}

PyObject* tree_insert(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&] {
    PyObject* a[2];
    bind_args<2>("insert", {"tokens", "block_ids"}, 2, args, nargs, kwnames, a);
    RadixTree& t = cpp_self<RadixTree>(self);
    thread_local InsertResult result;
    Int32View tv, bv;
    to_int32(a[0], "tokens", &scratch(0), &tv);
    to_int32(a[1], "block_ids", &scratch(1), &bv);
    {
      NoGil nogil;
      t.insert(tv.data, tv.size, bv.data, bv.size, &result);
    }
    return types()
        .make_insert_result(std::array<py::object, 3>{py::int_(result.num_adopted),
                                                      to_block_ids(result.adopted_block_ids),
                                                      to_block_ids(result.duplicate_block_ids)})
        .release()
        .ptr();
  });
}

PyObject* tree_lock(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&] {
    PyObject* a[1];
    bind_args<1>("lock", {"node"}, 1, args, nargs, kwnames, a);
    RadixTree& t = cpp_self<RadixTree>(self);
    const NodeHandle node = handle_arg(a[0], "lock", "node");
    LockHandle h;
    {
      NoGil nogil;
      h = t.lock(node);
    }
    return PyLong_FromUnsignedLongLong(h);
  });
}

PyObject* tree_unlock(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&] {
    PyObject* a[1];
    bind_args<1>("unlock", {"handle"}, 1, args, nargs, kwnames, a);
    RadixTree& t = cpp_self<RadixTree>(self);
    const LockHandle handle = handle_arg(a[0], "unlock", "handle");
    {
      NoGil nogil;
      t.unlock(handle);
    }
    return none();
  });
}

PyObject* tree_evict(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return guarded([&] {
    PyObject* a[2];
    bind_args<2>("evict", {"num_blocks", "tier"}, 1, args, nargs, kwnames, a);
    RadixTree& t = cpp_self<RadixTree>(self);
    const int32_t num_blocks = int32_arg(a[0], "evict", "num_blocks");
    const Tier tier = a[1] == nullptr ? Tier::kGpu : to_tier(a[1]);
    thread_local std::vector<BlockId> out;  // reused: no heap traffic per call
    out.clear();
    {
      NoGil nogil;
      t.evict(num_blocks, tier, &out);
    }
    return to_block_ids(out).release().ptr();
  });
}

PyObject* pool_can_allocate(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                            PyObject* kwnames) {
  return guarded([&] {
    PyObject* a[1];
    bind_args<1>("can_allocate", {"num_blocks"}, 1, args, nargs, kwnames, a);
    BlockPool& p = cpp_self<BlockPool>(self);
    return PyBool_FromLong(p.can_allocate(int32_arg(a[0], "can_allocate", "num_blocks")));
  });
}

PyObject* pool_allocate(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                        PyObject* kwnames) {
  return guarded([&] {
    PyObject* a[1];
    bind_args<1>("allocate", {"num_blocks"}, 1, args, nargs, kwnames, a);
    BlockPool& p = cpp_self<BlockPool>(self);
    const int32_t num_blocks = int32_arg(a[0], "allocate", "num_blocks");
    thread_local std::vector<BlockId> out;  // reused: no heap traffic per call
    out.clear();
    {
      NoGil nogil;
      p.allocate_into(num_blocks, &out);
    }
    return to_block_ids(out).release().ptr();
  });
}

template <bool kIncref>
PyObject* pool_change_refs(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                           PyObject* kwnames) {
  return guarded([&] {
    const char* method = kIncref ? "incref" : "decref";
    PyObject* a[1];
    bind_args<1>(method, {"block_ids"}, 1, args, nargs, kwnames, a);
    BlockPool& p = cpp_self<BlockPool>(self);
    Int32View v;
    to_int32(a[0], "block_ids", &scratch(0), &v);
    NoGil nogil;
    if (kIncref) {
      p.incref(v.data, v.size);
    } else {
      p.decref(v.data, v.size);
    }
    return none();
  });
}

// Method tables (static storage: the descriptors point into them for the process lifetime).
constexpr int kFast = METH_FASTCALL | METH_KEYWORDS;
PyMethodDef kTreeMethods[] = {
    {"match_prefix", reinterpret_cast<PyCFunction>(tree_match_prefix), kFast,
     "match_prefix(self, tokens) -> MatchResult: longest cached prefix (touches the path)."},
    {"insert", reinterpret_cast<PyCFunction>(tree_insert), kFast,
     "insert(self, tokens, block_ids) -> InsertResult."},
    {"lock", reinterpret_cast<PyCFunction>(tree_lock), kFast,
     "lock(self, node) -> int: pins the root->node path; returns a lock handle."},
    {"unlock", reinterpret_cast<PyCFunction>(tree_unlock), kFast,
     "unlock(self, handle) -> None: releases a lock() handle."},
    {"evict", reinterpret_cast<PyCFunction>(tree_evict), kFast,
     "evict(self, num_blocks, tier=0) -> BlockIds: frees LRU unlocked leaves."},
};
PyMethodDef kPoolMethods[] = {
    {"can_allocate", reinterpret_cast<PyCFunction>(pool_can_allocate), kFast,
     "can_allocate(self, num_blocks) -> bool"},
    {"allocate", reinterpret_cast<PyCFunction>(pool_allocate), kFast,
     "allocate(self, num_blocks) -> BlockIds: ids with ref_count 1 each."},
    {"incref", reinterpret_cast<PyCFunction>(pool_change_refs<true>), kFast,
     "incref(self, block_ids) -> None"},
    {"decref", reinterpret_cast<PyCFunction>(pool_change_refs<false>), kFast,
     "decref(self, block_ids) -> None"},
};

template <size_t N>
void add_methods(const py::object& cls, PyMethodDef (&defs)[N]) {
  for (PyMethodDef& def : defs) {
    PyObject* descr = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(cls.ptr()), &def);
    if (descr == nullptr) throw py::error_already_set();
    int rc = PyObject_SetAttrString(cls.ptr(), def.ml_name, descr);
    Py_DECREF(descr);
    if (rc != 0) throw py::error_already_set();
  }
}

}  // namespace

void add_fast_methods(const py::object& pool_cls, const py::object& tree_cls) {
  add_methods(pool_cls, kPoolMethods);
  add_methods(tree_cls, kTreeMethods);
}

}  // namespace pdserve::bindings
