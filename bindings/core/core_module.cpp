// pybind11 bindings of the cache core (pdserve._core): argument conversion (lists or numpy integer
// arrays, zero copy for contiguous int32), GIL release around the C++ calls, and results built
// directly as the dataclasses of pdserve.cache.types (no tuple round trip through Python code).
// The typed wrappers in python/pdserve/cache/ subclass these classes; _core.pyi documents them.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "pdserve/block_hash.h"
#include "pdserve/block_pool.h"
#include "pdserve/evictor.h"
#include "pdserve/radix_tree.h"

namespace py = pybind11;
using namespace pdserve;

namespace {

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

[[noreturn]] void bad_value(const char* name, size_t index, long long value) {
  throw py::value_error(std::string(name) + "[" + std::to_string(index) +
                        "] = " + std::to_string(value) + " does not fit in int32");
}

template <typename T>
void copy_strided(const Py_buffer& buf, const char* name, std::vector<int32_t>* scratch) {
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

void to_int32(py::handle obj, const char* name, std::vector<int32_t>* scratch, Int32View* view) {
  PyObject* o = obj.ptr();
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
        throw py::value_error(std::string(name) + "[" + std::to_string(i) +
                              "] does not fit in int32");
      }
      dst[i] = static_cast<int32_t>(v);
    }
    view->data = scratch->data();
    view->size = scratch->size();
    return;
  }
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
  throw py::type_error(std::string(name) +
                       " must be a list of ints or a 1-D numpy int32/int64 array, got " +
                       Py_TYPE(o)->tp_name);
}

std::vector<int32_t>& scratch(int slot) {
  thread_local std::vector<int32_t> buffers[2];
  return buffers[slot];
}

// Python ints for block ids, created once and shared (ints are immutable): turning a result of
// hundreds of block ids into a list then costs one reference increment per id. BlockPool's
// constructor creates them in id order, so neighbouring ids share cache lines.
constexpr long long kMaxCachedInt = 1 << 20;
std::vector<PyObject*>& int_cache() {
  static auto* cache = new std::vector<PyObject*>();  // only touched with the GIL held; leaked
  return *cache;
}

void prefill_int_cache(long long count) {
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

PyObject* small_int(long long value) {
  std::vector<PyObject*>& cache = int_cache();
  if (value < 0 || value >= static_cast<long long>(cache.size())) {
    return PyLong_FromLongLong(value);
  }
  PyObject* item = cache[static_cast<size_t>(value)];
  Py_INCREF(item);
  return item;
}

template <typename T>
py::list to_list(const std::vector<T>& values) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(values.size()));
  if (list == nullptr) throw py::error_already_set();
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* item = small_int(static_cast<long long>(values[i]));
    if (item == nullptr) {
      Py_DECREF(list);
      throw py::error_already_set();
    }
    PyList_SET_ITEM(list, i, item);
  }
  return py::reinterpret_steal<py::list>(list);
}

py::list u64_list(const std::vector<uint64_t>& values) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(values.size()));
  if (list == nullptr) throw py::error_already_set();
  for (size_t i = 0; i < values.size(); ++i) {
    PyList_SET_ITEM(list, i, PyLong_FromUnsignedLongLong(values[i]));
  }
  return py::reinterpret_steal<py::list>(list);
}

py::list tier_list(const std::vector<Tier>& tiers) {
  PyObject* values[2] = {small_int(0), small_int(1)};  // new references, dropped below
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(tiers.size()));
  if (list != nullptr) {
    for (size_t i = 0; i < tiers.size(); ++i) {
      PyObject* item = values[static_cast<int>(tiers[i])];
      Py_INCREF(item);
      PyList_SET_ITEM(list, i, item);
    }
  }
  Py_DECREF(values[0]);
  Py_DECREF(values[1]);
  if (list == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::list>(list);
}

// Accepts 0 / 1 or a pdserve.cache.Tier (an IntEnum) without going through Python-level __index__.
Tier to_tier(py::handle obj) {
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

// The result classes of pdserve.cache.types, looked up once (the module is imported by
// pdserve.cache before any of these calls can happen) and kept for the process lifetime.
struct ResultTypes {
  py::object match_result, insert_result, ticket, cache_event, eviction_plan;
  py::object tiers[2];
  py::object event_kinds[4];
  py::object ticket_kinds[2];
};

const ResultTypes& types() {
  static ResultTypes* cached = nullptr;  // leaked on purpose: outlives interpreter teardown order
  if (cached == nullptr) {
    py::module_ m = py::module_::import("pdserve.cache.types");
    auto* t = new ResultTypes();
    t->match_result = m.attr("MatchResult");
    t->insert_result = m.attr("InsertResult");
    t->ticket = m.attr("Ticket");
    t->cache_event = m.attr("CacheEvent");
    t->eviction_plan = m.attr("EvictionPlan");
    for (int i = 0; i < 2; ++i) t->tiers[i] = m.attr("Tier")(i);
    py::tuple event_kinds = m.attr("EVENT_KINDS");
    for (int i = 0; i < 4; ++i) t->event_kinds[i] = event_kinds[i];
    py::tuple ticket_kinds = m.attr("TICKET_KINDS");
    for (int i = 0; i < 2; ++i) t->ticket_kinds[i] = ticket_kinds[i];
    cached = t;
  }
  return *cached;
}

const py::object& tier_object(Tier tier) { return types().tiers[static_cast<int>(tier)]; }

// Calls cls(*args) through vectorcall (no argument tuple).
template <size_t N>
py::object construct(const py::object& cls, std::array<py::object, N> args) {
  PyObject* raw[N];
  for (size_t i = 0; i < N; ++i) raw[i] = args[i].ptr();
  PyObject* out = PyObject_Vectorcall(cls.ptr(), raw, N, nullptr);
  if (out == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(out);
}

py::object ticket_object(const Ticket& t) {
  const ResultTypes& ty = types();
  return construct<6>(ty.ticket, {py::int_(t.ticket_id), ty.ticket_kinds[static_cast<int>(t.kind)],
                                  tier_object(t.src_tier), tier_object(t.dst_tier),
                                  to_list(t.src_block_ids), to_list(t.dst_block_ids)});
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pdserve cache core: block pools, radix tree, evictor (see pdserve/_core.pyi)";
  m.attr("TIER_GPU") = 0;
  m.attr("TIER_HOST") = 1;

  m.def(
      "hash_blocks",
      [](py::handle tokens, int block_size, uint64_t parent_hash) {
        if (block_size <= 0) {
          throw py::value_error("block_size must be > 0, got " + std::to_string(block_size));
        }
        Int32View view;
        to_int32(tokens, "tokens", &scratch(0), &view);
        std::vector<uint64_t> out;
        {
          py::gil_scoped_release release;
          hash_blocks(view.data, view.size, block_size, parent_hash, &out);
        }
        return u64_list(out);
      },
      py::arg("tokens"), py::arg("block_size"), py::arg("parent_hash") = 0);

  py::class_<BlockPool, std::shared_ptr<BlockPool>>(m, "BlockPool")
      .def(py::init([](int num_blocks, py::handle tier) {
             auto pool = std::make_shared<BlockPool>(num_blocks, to_tier(tier));
             prefill_int_cache(std::max(num_blocks, 2));
             return pool;
           }),
           py::arg("num_blocks"), py::arg("tier") = 0)
      .def_property_readonly("tier", [](const BlockPool& p) { return tier_object(p.tier()); })
      .def_property_readonly("num_total", &BlockPool::num_total)
      .def_property_readonly("num_free", &BlockPool::num_free)
      .def_property_readonly("num_cached", &BlockPool::num_cached)
      .def_property_readonly("num_in_use", &BlockPool::num_in_use)
      .def_property_readonly("num_reserved", &BlockPool::num_reserved)
      .def("can_allocate", &BlockPool::can_allocate, py::arg("num_blocks"))
      .def(
          "allocate",
          [](BlockPool& p, int num_blocks) {
            thread_local std::vector<BlockId> out;  // reused: no heap traffic per call
            out.clear();
            {
              py::gil_scoped_release release;
              p.allocate_into(num_blocks, &out);
            }
            return to_list(out);
          },
          py::arg("num_blocks"))
      .def(
          "incref",
          [](BlockPool& p, py::handle ids) {
            Int32View v;
            to_int32(ids, "block_ids", &scratch(0), &v);
            py::gil_scoped_release release;
            p.incref(v.data, v.size);
          },
          py::arg("block_ids"))
      .def(
          "decref",
          [](BlockPool& p, py::handle ids) {
            Int32View v;
            to_int32(ids, "block_ids", &scratch(0), &v);
            py::gil_scoped_release release;
            p.decref(v.data, v.size);
          },
          py::arg("block_ids"))
      .def("ref_count", &BlockPool::ref_count, py::arg("block_id"))
      .def("is_owned", &BlockPool::is_owned, py::arg("block_id"))
      .def(
          "reserve",
          [](BlockPool& p, const std::string& rid, int n) { return to_list(p.reserve(rid, n)); },
          py::arg("request_id"), py::arg("num_blocks"))
      .def(
          "reserved_blocks",
          [](const BlockPool& p, const std::string& rid) {
            return to_list(p.reserved_blocks(rid));
          },
          py::arg("request_id"))
      .def("release_reservation", &BlockPool::release_reservation, py::arg("request_id"))
      .def(
          "transfer_reservation",
          [](BlockPool& p, const std::string& rid) { return to_list(p.transfer_reservation(rid)); },
          py::arg("request_id"))
      .def("check_invariants", &BlockPool::check_invariants,
           py::call_guard<py::gil_scoped_release>());

  py::class_<RadixTree, std::shared_ptr<RadixTree>>(m, "RadixTree")
      .def(py::init([](int block_size, std::shared_ptr<BlockPool> gpu_pool,
                       std::shared_ptr<BlockPool> host_pool, bool record_events) {
             return std::make_shared<RadixTree>(block_size, std::move(gpu_pool),
                                                std::move(host_pool), record_events);
           }),
           py::arg("block_size"), py::arg("gpu_pool"), py::arg("host_pool") = nullptr,
           py::arg("record_events") = true)
      .def_property_readonly("block_size", &RadixTree::block_size)
      .def_property_readonly("has_host_tier", &RadixTree::has_host_tier)
      .def(
          "match_prefix",
          [](RadixTree& t, py::handle tokens) {
            thread_local MatchResult result;
            Int32View v;
            to_int32(tokens, "tokens", &scratch(0), &v);
            {
              py::gil_scoped_release release;
              t.match_prefix(v.data, v.size, &result);
            }
            return construct<4>(types().match_result,
                                {py::int_(result.num_tokens), to_list(result.block_ids),
                                 tier_list(result.tiers), py::int_(result.node)});
          },
          py::arg("tokens"))
      .def(
          "insert",
          [](RadixTree& t, py::handle tokens, py::handle block_ids) {
            thread_local InsertResult result;
            Int32View tv, bv;
            to_int32(tokens, "tokens", &scratch(0), &tv);
            to_int32(block_ids, "block_ids", &scratch(1), &bv);
            {
              py::gil_scoped_release release;
              t.insert(tv.data, tv.size, bv.data, bv.size, &result);
            }
            // The adopted ids are block_ids[whole - num_adopted : whole]: for a list argument,
            // hand back a slice of the caller's own (cache-hot) int objects.
            py::object adopted;
            const Py_ssize_t whole = static_cast<Py_ssize_t>(tv.size / t.block_size());
            if (PyList_CheckExact(block_ids.ptr()) && result.num_adopted > 0) {
              PyObject* slice = PyList_GetSlice(block_ids.ptr(), whole - result.num_adopted, whole);
              if (slice == nullptr) throw py::error_already_set();
              adopted = py::reinterpret_steal<py::object>(slice);
            } else {
              adopted = to_list(result.adopted_block_ids);
            }
            return construct<3>(types().insert_result, {py::int_(result.num_adopted), adopted,
                                                        to_list(result.duplicate_block_ids)});
          },
          py::arg("tokens"), py::arg("block_ids"))
      .def("lock", &RadixTree::lock, py::arg("node"), py::call_guard<py::gil_scoped_release>())
      .def("unlock", &RadixTree::unlock, py::arg("handle"),
           py::call_guard<py::gil_scoped_release>())
      .def(
          "evict",
          [](RadixTree& t, int num_blocks, py::handle tier) {
            thread_local std::vector<BlockId> out;  // reused: no heap traffic per call
            out.clear();
            Tier tr = to_tier(tier);
            {
              py::gil_scoped_release release;
              t.evict(num_blocks, tr, &out);
            }
            return to_list(out);
          },
          py::arg("num_blocks"), py::arg("tier") = 0)
      .def(
          "begin_demote",
          [](RadixTree& t, int num_blocks) {
            Ticket ticket;
            {
              py::gil_scoped_release release;
              ticket = t.begin_demote(num_blocks);
            }
            return ticket_object(ticket);
          },
          py::arg("num_blocks"))
      .def(
          "begin_promote",
          [](RadixTree& t, uint64_t node) {
            Ticket ticket;
            {
              py::gil_scoped_release release;
              ticket = t.begin_promote(node);
            }
            return ticket_object(ticket);
          },
          py::arg("node"))
      .def("commit", &RadixTree::commit, py::arg("ticket_id"), py::arg("ok"),
           py::call_guard<py::gil_scoped_release>())
      .def("drain_events",
           [](RadixTree& t) {
             std::vector<CacheEvent> events;
             {
               py::gil_scoped_release release;
               events = t.drain_events();
             }
             py::list out;
             const ResultTypes& ty = types();
             for (const CacheEvent& ev : events) {
               out.append(construct<5>(
                   ty.cache_event,
                   {ty.event_kinds[static_cast<int>(ev.kind)], tier_object(ev.tier),
                    py::int_(ev.parent_hash), u64_list(ev.block_hashes), to_list(ev.token_ids)}));
             }
             return out;
           })
      .def_property_readonly("num_nodes", &RadixTree::num_nodes)
      .def(
          "num_tree_blocks",
          [](const RadixTree& t, py::handle tier) { return t.num_tree_blocks(to_tier(tier)); },
          py::arg("tier") = 0)
      .def_property_readonly("num_pending_demote_blocks", &RadixTree::num_pending_demote_blocks)
      .def_property_readonly("num_locks", &RadixTree::num_locks)
      .def("check_invariants", &RadixTree::check_invariants,
           py::call_guard<py::gil_scoped_release>());

  py::class_<Evictor, std::shared_ptr<Evictor>>(m, "Evictor")
      .def(py::init([](std::shared_ptr<RadixTree> tree, double gpu_high, double gpu_low,
                       py::object host_high, py::object host_low) {
             double hh = host_high.is_none() ? -1.0 : host_high.cast<double>();
             double hl = host_low.is_none() ? -1.0 : host_low.cast<double>();
             if ((!host_high.is_none() && hh < 0) || (!host_low.is_none() && hl < 0)) {
               throw py::value_error(
                   "Evictor: HOST watermarks must satisfy 0 <= low <= high <= 1, "
                   "got high=" +
                   std::to_string(hh) + " low=" + std::to_string(hl));
             }
             return std::make_shared<Evictor>(std::move(tree), gpu_high, gpu_low, hh, hl);
           }),
           py::arg("tree"), py::arg("gpu_high"), py::arg("gpu_low"),
           py::arg("host_high") = py::none(), py::arg("host_low") = py::none())
      .def("plan", [](Evictor& e) {
        EvictionPlan plan;
        {
          py::gil_scoped_release release;
          plan = e.plan();
        }
        py::object ticket =
            plan.has_demote_ticket ? ticket_object(plan.demote_ticket) : py::object(py::none());
        return construct<3>(types().eviction_plan, {ticket, to_list(plan.freed_gpu_block_ids),
                                                    to_list(plan.freed_host_block_ids)});
      });
}
