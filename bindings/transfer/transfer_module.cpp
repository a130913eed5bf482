// pybind11 bindings of the transfer engine (module pdserve._transfer): argument conversion only.
// Every call that can block (connect, wait, wait_recv, abort, (un)register, expect, send, close)
// releases the GIL; the rest only copy a few fields under a short lock.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "pdserve/transfer/engine.h"

namespace py = pybind11;
using namespace pybind11::literals;
namespace tr = pdserve::transfer;

namespace {

py::dict peer_stats_dict(const tr::PeerStats& s) {
  return py::dict("bytes_sent"_a = s.bytes_sent, "bytes_received"_a = s.bytes_received,
                  "bytes_rejected"_a = s.bytes_rejected, "tickets_done"_a = s.tickets_done,
                  "tickets_failed"_a = s.tickets_failed, "send_seconds"_a = s.send_seconds);
}

// pieces: array-like of shape (N, 3), rows (local_addr, remote_addr, nbytes), converted to uint64.
std::vector<tr::Piece> to_pieces(
    const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& pieces) {
  if (pieces.ndim() != 2 || pieces.shape(1) != 3) {
    std::string shape = "(";
    for (py::ssize_t i = 0; i < pieces.ndim(); ++i) {
      shape += std::to_string(pieces.shape(i)) + (i + 1 < pieces.ndim() ? ", " : "");
    }
    throw std::invalid_argument(
        "pieces must have shape (N, 3) = (local_addr, remote_addr, "
        "nbytes) rows; got shape " +
        shape + ")");
  }
  auto view = pieces.unchecked<2>();
  std::vector<tr::Piece> out(static_cast<size_t>(pieces.shape(0)));
  for (py::ssize_t i = 0; i < pieces.shape(0); ++i) {
    out[i] = tr::Piece{view(i, 0), view(i, 1), view(i, 2)};
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_transfer, m) {
  m.doc() = "Transfer engine: raw-address KV transfer between processes (see pdserve.transfer).";

  py::register_exception<tr::TransferError>(m, "TransferError", PyExc_RuntimeError);

  py::class_<tr::SendResult>(m, "SendResult")
      .def_readonly("ticket", &tr::SendResult::ticket)
      .def_readonly("request_id", &tr::SendResult::request_id)
      .def_readonly("peer", &tr::SendResult::peer)
      .def_property_readonly("status",
                             [](const tr::SendResult& r) { return tr::status_name(r.status); })
      .def_readonly("nbytes", &tr::SendResult::nbytes)
      .def_readonly("seconds", &tr::SendResult::seconds)
      .def_readonly("error", &tr::SendResult::error);

  py::class_<tr::RecvResult>(m, "RecvResult")
      .def_readonly("request_id", &tr::RecvResult::request_id)
      .def_property_readonly("status",
                             [](const tr::RecvResult& r) { return tr::status_name(r.status); })
      .def_readonly("nbytes_expected", &tr::RecvResult::nbytes_expected)
      .def_readonly("nbytes_received", &tr::RecvResult::nbytes_received)
      .def_readonly("seconds", &tr::RecvResult::seconds)
      .def_readonly("error", &tr::RecvResult::error);

  py::class_<tr::Completion>(m, "Completion")
      .def_readonly("is_send", &tr::Completion::is_send)
      .def_readonly("send", &tr::Completion::send)
      .def_readonly("recv", &tr::Completion::recv);

  py::class_<tr::TransferEngine>(m, "Engine")
      .def(py::init([](const std::string& backend, const std::string& host, int port,
                       double stall_timeout_s, uint64_t max_message_nbytes, double retention_s,
                       uint64_t device_copy_fn, const std::string& cluster_token) {
             tr::EngineConfig config;
             config.backend = backend;
             config.transport.host = host;
             config.transport.port = port;
             config.transport.stall_timeout_s = stall_timeout_s;
             config.transport.max_message_nbytes = max_message_nbytes;
             config.retention_s = retention_s;
             config.transport.device_copy_fn = device_copy_fn;
             config.transport.cluster_token = cluster_token;
             py::gil_scoped_release release;
             return std::make_unique<tr::TransferEngine>(config);
           }),
           "backend"_a = "tcp", "host"_a = "127.0.0.1", "port"_a = 0, "stall_timeout_s"_a = 30.0,
           "max_message_nbytes"_a = 1ull << 20, "retention_s"_a = 60.0, "device_copy_fn"_a = 0,
           "cluster_token"_a = "")
      .def_property_readonly("backend", &tr::TransferEngine::backend)
      .def_property_readonly("address", &tr::TransferEngine::address)
      .def("register_memory", &tr::TransferEngine::register_memory, "addr"_a, "nbytes"_a,
           "device"_a = tr::kHostDevice, py::call_guard<py::gil_scoped_release>())
      .def("unregister_memory", &tr::TransferEngine::unregister_memory, "region"_a,
           py::call_guard<py::gil_scoped_release>())
      .def("connect", &tr::TransferEngine::connect, "peer"_a, "timeout_s"_a = 10.0,
           py::call_guard<py::gil_scoped_release>())
      .def("connected", &tr::TransferEngine::connected, "peer"_a)
      .def("expect", &tr::TransferEngine::expect, "request_id"_a, "nbytes"_a, "timeout_s"_a,
           "from_peer"_a = "", py::call_guard<py::gil_scoped_release>())
      .def("wait_recv", &tr::TransferEngine::wait_recv, "request_id"_a, "timeout_s"_a = -1.0,
           py::call_guard<py::gil_scoped_release>())
      .def("poll_recv", &tr::TransferEngine::poll_recv, "request_id"_a)
      .def(
          "send",
          [](tr::TransferEngine& e, const std::string& peer, const std::string& request_id,
             const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& pieces,
             double timeout_s, uint64_t stream, uint64_t ready_event) {
            std::vector<tr::Piece> converted = to_pieces(pieces);
            tr::SendOptions options;
            options.timeout_s = timeout_s;
            options.stream = stream;
            options.ready_event = ready_event;
            py::gil_scoped_release release;
            return e.send(peer, request_id, std::move(converted), options);
          },
          "peer"_a, "request_id"_a, "pieces"_a, "timeout_s"_a = 0.0, "stream"_a = 0,
          "ready_event"_a = 0)
      .def("wait", &tr::TransferEngine::wait, "ticket"_a, "timeout_s"_a = -1.0,
           py::call_guard<py::gil_scoped_release>())
      .def("poll", &tr::TransferEngine::poll, "ticket"_a)
      .def("abort", &tr::TransferEngine::abort, "request_id"_a, "reason"_a = "aborted",
           py::call_guard<py::gil_scoped_release>())
      .def("stats",
           [](const tr::TransferEngine& e) {
             tr::EngineStats s = e.stats();
             py::dict peers;
             for (const auto& [peer, ps] : s.peers) peers[py::str(peer)] = peer_stats_dict(ps);
             py::dict out = peer_stats_dict(s.total);
             out["peers"] = peers;
             out["recvs_done"] = s.recvs_done;
             out["recvs_timed_out"] = s.recvs_timed_out;
             out["recvs_aborted"] = s.recvs_aborted;
             out["recvs_failed"] = s.recvs_failed;
             out["recv_seconds"] = s.recv_seconds;
             out["num_regions"] = s.num_regions;
             out["num_pending_recvs"] = s.num_pending_recvs;
             out["num_pending_tickets"] = s.num_pending_tickets;
             return out;
           })
      .def("completion_fd", &tr::TransferEngine::completion_fd)
      .def("watch", &tr::TransferEngine::watch, "ticket"_a)
      .def("watch_recv", &tr::TransferEngine::watch_recv, "request_id"_a)
      .def("drain_completions", &tr::TransferEngine::drain_completions)
      .def("close", &tr::TransferEngine::close, py::call_guard<py::gil_scoped_release>());
}
