// Backend selection by name and the status names shared by every backend.
#include "pdserve/transfer/transport.h"

#include <stdexcept>

#include "backends.h"

namespace pdserve::transfer {

const char* status_name(Status status) {
  switch (status) {
    case Status::kPending:
      return "pending";
    case Status::kDone:
      return "done";
    case Status::kTimedOut:
      return "timed_out";
    case Status::kAborted:
      return "aborted";
    case Status::kFailed:
      return "failed";
  }
  return "unknown";
}

std::unique_ptr<Transport> make_transport(const std::string& backend,
                                          const TransportConfig& config) {
  if (backend == "tcp") return make_tcp_transport(config);
  if (backend == "cuda_ipc") return make_cuda_ipc_transport(config);
  throw std::invalid_argument("unknown transfer backend '" + backend +
                              "' (available: tcp, cuda_ipc; nccl is planned)");
}

}  // namespace pdserve::transfer
