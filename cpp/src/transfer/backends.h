// Constructors of the wire backends, private to the transfer library; make_transport() picks one.
// NCCL ("nccl") adds its constructor here when it lands.
#pragma once

#include <memory>

#include "pdserve/transfer/transport.h"

namespace pdserve::transfer {

std::unique_ptr<Transport> make_tcp_transport(const TransportConfig& config);
// TCP connections carrying GPU memory locations; the sender copies through CUDA IPC mappings.
std::unique_ptr<Transport> make_cuda_ipc_transport(const TransportConfig& config);

}  // namespace pdserve::transfer
