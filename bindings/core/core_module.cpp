// pybind11 bindings of the cache core (pdserve._core): argument conversion (BlockIds, lists, numpy
// integer arrays; zero copy for BlockIds and contiguous int32), GIL release around the C++ calls,
// and results built directly as the dataclasses of pdserve.cache.types (no tuple round trip
// through Python code), block ids as pdserve._core.BlockIds (block_ids.cpp).
// The typed wrappers in python/pdserve/cache/ subclass these classes; _core.pyi documents them.
// The per-request methods are installed separately (fast_methods.cpp); conversions: convert.h.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "convert.h"
#include "pdserve/block_hash.h"
#include "pdserve/block_pool.h"
#include "pdserve/evictor.h"
#include "pdserve/radix_tree.h"

namespace py = pybind11;
using namespace pdserve;
using namespace pdserve::bindings;

namespace pdserve::bindings {
// Installs the METH_FASTCALL versions of the per-request methods (fast_methods.cpp).
void add_fast_methods(const py::object& pool_cls, const py::object& tree_cls);
}  // namespace pdserve::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "pdserve cache core: block pools, radix tree, evictor (see pdserve/_core.pyi)";
  add_block_ids_type(m.ptr());
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

  py::class_<BlockPool, std::shared_ptr<BlockPool>> pool_cls(m, "BlockPool");
  pool_cls
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
      .def("ref_count", &BlockPool::ref_count, py::arg("block_id"))
      .def("is_owned", &BlockPool::is_owned, py::arg("block_id"))
      .def(
          "reserve",
          [](BlockPool& p, const std::string& rid, int n) {
            return to_block_ids(p.reserve(rid, n));
          },
          py::arg("request_id"), py::arg("num_blocks"))
      .def(
          "reserved_blocks",
          [](const BlockPool& p, const std::string& rid) {
            return to_block_ids(p.reserved_blocks(rid));
          },
          py::arg("request_id"))
      .def("release_reservation", &BlockPool::release_reservation, py::arg("request_id"))
      .def(
          "transfer_reservation",
          [](BlockPool& p, const std::string& rid) {
            return to_block_ids(p.transfer_reservation(rid));
          },
          py::arg("request_id"))
      .def("check_invariants", &BlockPool::check_invariants,
           py::call_guard<py::gil_scoped_release>());

  py::class_<RadixTree, std::shared_ptr<RadixTree>> tree_cls(m, "RadixTree");
  tree_cls
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

  add_fast_methods(pool_cls, tree_cls);

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
        return construct<3>(types().eviction_plan, {ticket, to_block_ids(plan.freed_gpu_block_ids),
                                                    to_block_ids(plan.freed_host_block_ids)});
      });
}
