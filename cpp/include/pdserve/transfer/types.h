// Plain value types of the transfer engine's public API, shared by every backend (TCP now, NCCL and
// CUDA IPC later). Addresses are raw integers and sizes are bytes: nothing here knows about
// tensors.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>

namespace pdserve::transfer {

using Ticket = uint64_t;    // one submitted send batch; unique per engine, never 0
using RegionId = uint64_t;  // one registered memory region; unique per engine, never 0

// Device ordinal of host memory in register_memory(); >= 0 names a CUDA device.
constexpr int kHostDevice = -1;

// One contiguous copy of nbytes from local_addr (this process, inside a registered region) to
// remote_addr (the peer's process, inside one of the peer's registered regions).
struct Piece {
  uint64_t local_addr = 0;
  uint64_t remote_addr = 0;
  uint64_t nbytes = 0;
};

// Lifecycle of a send ticket or a receive record. kPending is the only non-terminal state.
enum class Status : uint8_t { kPending = 0, kDone = 1, kTimedOut = 2, kAborted = 3, kFailed = 4 };

// "pending", "done", "timed_out", "aborted", "failed" (the names Python sees).
const char* status_name(Status status);

// Per-send options. The GPU slot (stream, ready_event) is for device-memory backends: NCCL enqueues
// its send on `stream` after `ready_event` (a cudaEvent_t recorded when the layer's KV was
// written); CUDA IPC does its memcpy likewise. 0 means none. The TCP backend moves host memory only
// and rejects non-zero values.
struct SendOptions {
  double timeout_s = 0.0;    // 0: no deadline; else the ticket ends kTimedOut past it
  uint64_t stream = 0;       // cudaStream_t, or 0
  uint64_t ready_event = 0;  // cudaEvent_t, or 0
};

// Outcome of one send ticket. Terminal statuses are reported only once the backend no longer reads
// the ticket's local memory, so the caller may reuse its blocks as soon as it sees one.
struct SendResult {
  Ticket ticket = 0;
  std::string request_id;
  std::string peer;
  Status status = Status::kPending;
  uint64_t nbytes = 0;   // bytes in the batch
  double seconds = 0.0;  // submit -> terminal (0 while pending)
  std::string error;     // empty unless failed / timed out / aborted
};

// Outcome of one expect(). Terminal statuses are reported only once no write into the receiver's
// memory for that request is in flight, so the caller may release its blocks as soon as it sees
// one.
struct RecvResult {
  std::string request_id;
  Status status = Status::kPending;
  uint64_t nbytes_expected = 0;
  uint64_t nbytes_received = 0;
  double seconds = 0.0;  // expect -> terminal (0 while pending)
  std::string error;
};

// One finished ticket or receive, as drained from the completion queue (asyncio integration).
struct Completion {
  bool is_send = false;
  SendResult send;  // valid when is_send
  RecvResult recv;  // valid otherwise
};

// Byte counters and timings of one peer (or of all peers, summed).
struct PeerStats {
  uint64_t bytes_sent = 0;      // acknowledged by the receiver
  uint64_t bytes_received = 0;  // written into registered memory
  uint64_t bytes_rejected = 0;  // refused by this receiver (not expected, out of range, overflow)
  uint64_t tickets_done = 0;
  uint64_t tickets_failed = 0;  // failed, timed out or aborted
  double send_seconds = 0.0;    // sum over finished tickets of submit -> ack
};

struct EngineStats {
  PeerStats total;
  std::map<std::string, PeerStats> peers;  // keyed by peer address
  uint64_t recvs_done = 0;
  uint64_t recvs_timed_out = 0;
  uint64_t recvs_aborted = 0;
  uint64_t recvs_failed = 0;
  double recv_seconds = 0.0;  // sum over completed receives of expect -> last byte
  uint64_t num_regions = 0;
  uint64_t num_pending_recvs = 0;
  uint64_t num_pending_tickets = 0;
};

// A transfer could not be set up or carried out (connection refused, peer gone, engine closed).
// Bad arguments throw std::invalid_argument instead.
class TransferError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace pdserve::transfer
