// pybind11 declarations of pdserve._cuda: raw integer addresses, sizes and stream handles in, the
// launchers in cuda/kv_copy.h do every check. Launches run with the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "copy_runs.h"
#include "kv_copy.h"

namespace py = pybind11;
namespace pc = pdserve::cuda;

void bind_ipc_collectives(py::module_& m);  // ipc_bindings.cpp

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "CUDA KV block copy kernels (gather, scatter, tier copy) and the IPC collectives of tensor "
      "parallelism, on raw addresses. Use the typed wrappers in pdserve.cache.kernels and "
      "pdserve.engine.ipc_collectives; see pdserve/_cuda.pyi.";

  m.def("gather_blocks", &pc::gather_blocks, py::call_guard<py::gil_scoped_release>(),
        py::arg("src_addr"), py::arg("block_stride_nbytes"), py::arg("src_num_blocks"),
        py::arg("block_ids_addr"), py::arg("num_ids"), py::arg("dst_addr"), py::arg("piece_nbytes"),
        py::arg("stream"), py::arg("version") = 0);

  m.def("scatter_blocks", &pc::scatter_blocks, py::call_guard<py::gil_scoped_release>(),
        py::arg("src_addr"), py::arg("block_ids_addr"), py::arg("num_ids"), py::arg("dst_addr"),
        py::arg("block_stride_nbytes"), py::arg("dst_num_blocks"), py::arg("piece_nbytes"),
        py::arg("stream"), py::arg("version") = 0);

  m.def("copy_blocks", &pc::copy_blocks, py::call_guard<py::gil_scoped_release>(),
        py::arg("src_addr"), py::arg("src_stride_nbytes"), py::arg("src_num_blocks"),
        py::arg("dst_addr"), py::arg("dst_stride_nbytes"), py::arg("dst_num_blocks"),
        py::arg("src_ids_addr"), py::arg("dst_ids_addr"), py::arg("num_pairs"),
        py::arg("piece_nbytes"), py::arg("stream"), py::arg("version") = 0);

  m.def("kernel_version_name", &pc::kernel_version_name, py::arg("version"));
  m.def(
      "copy_runs_address", [] { return reinterpret_cast<uint64_t>(&pdserve_copy_runs); },
      "Address of pdserve_copy_runs (cuda/copy_runs.h), for the cuda_ipc transfer backend.");
  m.attr("NUM_KERNEL_VERSIONS") = static_cast<int>(pc::kNumKernelVersions);
  bind_ipc_collectives(m);
}
