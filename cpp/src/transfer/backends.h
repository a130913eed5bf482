// Constructors of the wire backends, private to the transfer library; make_transport() picks one.
// NCCL ("nccl") and CUDA IPC ("cuda_ipc") add their constructors here when they land.
#pragma once

#include <memory>

#include "pdserve/transfer/transport.h"

namespace pdserve::transfer {

std::unique_ptr<Transport> make_tcp_transport(const TransportConfig& config);

}  // namespace pdserve::transfer
