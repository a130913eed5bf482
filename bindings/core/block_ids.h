// pdserve._core.BlockIds: the immutable int32 sequence that every block-id result of the cache core
// is (match_prefix, insert, allocate, evict, reservations, tickets, eviction plans). A raw CPython
// type, one allocation with the ids stored inline like bytes: building hundreds of Python ints per
// request, and freeing them again, cost more than the tree walk that produced them.
#pragma once

#include <Python.h>

#include <cstdint>

namespace pdserve::bindings {

// ob_size ids follow the header; never resized or written after creation.
struct BlockIdsObject {
  PyObject_VAR_HEAD int32_t ids[1];
};

extern PyTypeObject BlockIdsType;  // final: no subclasses, so an exact type check suffices

inline bool is_block_ids(PyObject* o) { return Py_TYPE(o) == &BlockIdsType; }
inline const int32_t* block_ids_data(PyObject* o) {
  return reinterpret_cast<const BlockIdsObject*>(o)->ids;
}

// A new reference to a BlockIds holding a copy of data[0, n) (the shared empty one for n == 0);
// nullptr with a Python error set when out of memory.
PyObject* block_ids_from(const int32_t* data, Py_ssize_t n);

// Readies the type, adds it to `module` as BlockIds and registers it as a
// collections.abc.Sequence. Raises (pybind11 error_already_set) on failure.
void add_block_ids_type(PyObject* module);

}  // namespace pdserve::bindings
