// The seam between the transfer engine (bookkeeping: regions, expects, tickets, deadlines, stats)
// and one wire backend (tcp, cuda_ipc; NCCL later). A backend only moves bytes and reports
// what happened through TransportHost; it never decides when a request is complete.
#pragma once

#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "pdserve/transfer/types.h"

namespace pdserve::transfer {

// A piece as it arrives at a receiver: the destination range in the receiver's memory.
struct WirePiece {
  uint64_t remote_addr = 0;
  uint64_t nbytes = 0;
};

// Permission to write one message's payload into registered memory. While it lives, the regions
// cannot be unregistered and the request cannot settle; hand it back through TransportHost::landed.
struct Admission {
  bool ok = false;
  std::string error;  // why not, when !ok
  std::string request_id;
  std::shared_lock<std::shared_mutex> regions_guard;
};

// What a backend reports to the engine. Every method is thread-safe and non-blocking (no method
// waits for another transfer), so backends may call them from their I/O threads.
class TransportHost {
 public:
  virtual ~TransportHost() = default;

  // Receiver: may this message (pieces totalling nbytes, from peer, for request_id) be written?
  // Checks that the request is expected and pending, that nbytes fits in what is still expected,
  // and that every piece lies inside one registered region. A refused message must be consumed
  // without writing; a refusal of a pending request fails that request.
  virtual Admission admit(const std::string& request_id, const std::string& peer,
                          const WirePiece* pieces, size_t num_pieces, uint64_t nbytes) = 0;
  // Receiver: the admitted payload was written (error empty) or not (error says why: the
  // connection broke mid-way, a copy failed); a failure fails the request. Call it on the thread
  // that called admit() (the admission holds a shared lock).
  virtual void landed(Admission admission, const std::string& peer, uint64_t nbytes,
                      const std::string& error) = 0;
  // Receiver: the connection from peer is gone; its pending requests fail.
  virtual void inbound_lost(const std::string& peer, const std::string& reason) = 0;

  // Sender: a batch ended (kDone once acknowledged) and the backend no longer reads its memory.
  virtual void batch_done(Ticket ticket, Status status, const std::string& error) = 0;

  // Either side: the peer aborted request_id. Fails the local receive of it and cancels local
  // sends.
  virtual void remote_abort(const std::string& request_id, const std::string& reason) = 0;

  // Sender: hold while reading local registered memory so that it cannot be unregistered meanwhile.
  virtual std::shared_lock<std::shared_mutex> local_memory_guard() = 0;
};

// One batch handed to a backend: pieces already validated against local registered memory.
struct SendBatch {
  Ticket ticket = 0;
  std::string request_id;
  std::vector<Piece> pieces;
  uint64_t nbytes = 0;
  SendOptions options;
};

struct TransportConfig {
  std::string host = "127.0.0.1";  // address to listen on (and to advertise)
  int port = 0;                    // 0: any free port
  double stall_timeout_s = 30.0;   // a transfer making no progress this long drops the connection
  // Payload bytes per wire message: bounds how long an abort waits for the message in flight, and
  // ~1 MiB keeps the copies cache-friendly (faster on loopback than 8 MiB; bench_transfer.py).
  // cuda_ipc: bytes one message's copy covers at most (the bound on an abort's wait; each message
  // costs two round trips, so keep it large: pdserve.transfer uses 512 MiB, ~0.4 ms of copy).
  uint64_t max_message_nbytes = 1ull << 20;
  // cuda_ipc sender: the address of a function
  //   int fn(const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes, size_t count,
  //          void* stream)
  // that enqueues a message's copies as one kernel on the current device and returns 0 (a CUDA
  // error code otherwise); pdserve._cuda's pdserve_copy_runs. 0: the driver's copies (one per
  // piece, or cuMemcpyBatchAsync), which cost microseconds per piece.
  uint64_t device_copy_fn = 0;
  // The cluster's shared secret (--cluster-token / PDSERVE_CLUSTER_TOKEN), checked once per
  // connection, never per frame. Empty: no check, any peer that speaks the protocol is accepted.
  // Non-empty: a connecting peer must present the same token in its HELLO (compared in constant
  // time); a peer with another token, or none, is refused during the handshake and its connect()
  // throws TransferError saying the tokens differ. Either way connect() sends this token. At most
  // 1024 bytes (tcp_wire.h's kMaxRequestIdLen; longer: std::invalid_argument at construction).
  std::string cluster_token;
};

// A wire backend. Thread-safe. The engine owns it and calls start() once before anything else.
//
// The backends:
// - tcp: host memory; DATA frames carry the bytes (tcp_transport.h).
// - cuda_ipc (processes on one host, one GPU or several): per message, the receiver admits the
//   destination ranges and grants them as exported allocations and offsets; the sender maps them,
//   copies on its own high-priority stream, waits, and reports the copy's end (sender-side copy:
//   on a shared GPU it runs in the prefill's context, no context switch; see tcp_ipc.cpp).
//   supports_device_memory() and supports_streams() are true; options.stream is ignored.
// - nccl (planned, no change to the engine or to Python): connect() exchanges an ncclUniqueId over
// a TCP control channel (tcp_wire.h framing) and
//   creates a 2-rank communicator per peer. submit() sends the piece table as a control frame, then
//   enqueues ncclSend of each piece on options.stream after
//   cudaStreamWaitEvent(options.ready_event); the receiver admit()s the table, enqueues the
//   matching ncclRecv calls on its stream and calls landed() when an event recorded after them
//   completes; the ACK returns on the control channel.
class Transport {
 public:
  virtual ~Transport() = default;

  virtual std::string name() const = 0;
  // The address peers pass to connect(), e.g. "127.0.0.1:40123".
  virtual std::string address() const = 0;
  // Whether register_memory may name a CUDA device (device >= 0).
  virtual bool supports_device_memory() const = 0;
  // Whether SendOptions::stream / ready_event may be non-zero.
  virtual bool supports_streams() const = 0;

  virtual void start(TransportHost* host) = 0;
  // Opens (or reopens, if the previous one died) the channel to peer. Blocks up to timeout_s;
  // throws TransferError when the peer cannot be reached.
  virtual void connect(const std::string& peer, double timeout_s) = 0;
  // Whether a live channel to peer exists.
  virtual bool connected(const std::string& peer) const = 0;
  // Queues a batch. Never blocks on the network; the outcome comes through host->batch_done (which
  // may be called before submit returns, e.g. when the channel is already dead).
  virtual void submit(const std::string& peer, SendBatch batch) = 0;
  // Ends the local sends of request_id (or just one ticket when ticket != 0) with status/reason.
  // With wait, returns only once no backend thread reads their memory any more.
  virtual void cancel(const std::string& request_id, Ticket ticket, Status status,
                      const std::string& reason, bool wait) = 0;
  // Tells every connected peer that request_id is aborted (they fail its receive and its sends).
  virtual void broadcast_abort(const std::string& request_id, const std::string& reason) = 0;
  // Stops all threads and closes all channels; pending batches end kFailed. Idempotent.
  virtual void shutdown() = 0;
};

// Creates a backend by name ("tcp", "cuda_ipc"); throws std::invalid_argument for unknown names and
// TransferError when cuda_ipc finds no CUDA driver or GPU.
std::unique_ptr<Transport> make_transport(const std::string& backend,
                                          const TransportConfig& config);

}  // namespace pdserve::transfer
