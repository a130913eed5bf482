// pybind11 declarations of the IPC collectives (cuda/ipc_collectives.h): raw addresses in, the
// launchers do every check. Calls that launch or synchronize run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "ipc_collectives.h"

namespace py = pybind11;
namespace pc = pdserve::cuda;

void bind_ipc_collectives(py::module_& m) {
  py::class_<pc::IpcCall>(m, "IpcCall",
                          "One rank's fixed arguments of the IPC collectives (see _cuda.pyi).")
      .def(py::init<>())
      .def_readwrite("device", &pc::IpcCall::device)
      .def_readwrite("regions", &pc::IpcCall::regions)
      .def_readwrite("rank", &pc::IpcCall::rank)
      .def_readwrite("counters_addr", &pc::IpcCall::counters_addr)
      .def_readwrite("abort_addr", &pc::IpcCall::abort_addr)
      .def_readwrite("capacity", &pc::IpcCall::capacity)
      .def_readwrite("timeout_ns", &pc::IpcCall::timeout_ns);

  m.def("ipc_alloc", &pc::ipc_alloc, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("nbytes"));
  m.def("ipc_free", &pc::ipc_free, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("addr"));
  m.def(
      "ipc_handle",
      [](int device, uint64_t addr) { return py::bytes(pc::ipc_handle(device, addr)); },
      py::arg("device"), py::arg("addr"));
  m.def(
      "ipc_open",
      [](int device, py::bytes handle) {
        std::string h = handle;
        py::gil_scoped_release release;
        return pc::ipc_open(device, h);
      },
      py::arg("device"), py::arg("handle"));
  m.def("ipc_close", &pc::ipc_close, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("addr"));
  m.def("ipc_all_reduce", &pc::ipc_all_reduce, py::call_guard<py::gil_scoped_release>(),
        py::arg("call"), py::arg("in_addr"), py::arg("out_addr"), py::arg("nbytes"),
        py::arg("dtype"), py::arg("stream"));
  m.def("ipc_gather", &pc::ipc_gather, py::call_guard<py::gil_scoped_release>(), py::arg("call"),
        py::arg("in_addr"), py::arg("out_addr"), py::arg("nbytes"), py::arg("out_rank_stride"),
        py::arg("root"), py::arg("stream"));
  m.attr("IPC_SIGNAL_NBYTES") = pc::kIpcSignalNbytes;
  m.attr("IPC_MAX_RANKS") = pc::kIpcMaxRanks;
  m.attr("IPC_MAX_BLOCKS") = pc::kIpcMaxBlocks;
}
