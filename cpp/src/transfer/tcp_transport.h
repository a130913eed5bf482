// The TCP backend's connection state and threads (private to the transfer library): the sender
// side lives in tcp_transport.cpp, the receiver side (listener, one reader per inbound connection)
// in tcp_receiver.cpp. The cuda_ipc backend is the same class with `ipc` set: the socket carries
// where the bytes go in GPU memory and the sender copies them (ipc_payload.h, tcp_ipc.cpp).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "ipc_payload.h"
#include "pdserve/transfer/transport.h"
#include "tcp_wire.h"

namespace pdserve::transfer::tcp {

// One batch on the sender side. Lives in OutConn::batches until finished.
struct OutBatch {
  SendBatch batch;
  size_t next_piece = 0;  // cursor: the next byte to send is pieces[next_piece] + next_offset
  uint64_t next_offset = 0;
  bool writing_done = false;  // the writer thread will not read this batch's memory any more
  bool replied = false;       // ACK or NACK arrived
  bool cancelled = false;     // stop sending the rest (NACK, cancel, abort, timeout)
  bool finished = false;      // reported through batch_done
  // cuda_ipc: this library's copy of options.ready_event (made at submit, so the caller's event may
  // die at once), on ready_device; null when none or once waited for.
  cuda::CUevent ready_event = nullptr;
  int ready_device = -1;
  Status status = Status::kPending;  // first cause wins
  std::string error;

  OutBatch() = default;
  OutBatch(const OutBatch&) = delete;
  OutBatch& operator=(const OutBatch&) = delete;
  ~OutBatch() {
    if (ready_event != nullptr) cuda::Driver::get().destroy_event(ready_device, ready_event);
  }

  void set_outcome(Status s, const std::string& e) {
    if (status != Status::kPending) return;
    status = s;
    error = e;
  }
};

// A connection we opened to a receiver. Invariant (under mu): every unfinished batch is in
// `batches`; those not fully written are also in `queue` (round-robin across requests, submission
// order within one request); `writing` is the batch whose bytes the writer thread is sending right
// now (outside mu), or null.
// cuda_ipc: one message in flight; the writer waits for each answer (grant, then the answer to its
// copy report), and while `ipc_in_flight` nobody but the writer may shut the socket (kill_out
// leaves it to the writer), since the receiver holds the granted ranges until it hears the copy
// ended.
struct OutConn {
  std::string peer;
  int fd = -1;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<OutBatch>> queue;
  std::unordered_map<Ticket, std::shared_ptr<OutBatch>> batches;
  std::deque<std::pair<std::string, std::string>> aborts;  // (request id, reason) to send first
  OutBatch* writing = nullptr;
  bool ipc_answered = false;  // cuda_ipc: an answer to the message in flight arrived
  bool ipc_ok = false;    // ... it was IPC_GRANT (for the write request) or ACK (for the report)
  std::string ipc_error;  // ... NACK's reason
  std::vector<ipc::IpcAllocation> ipc_allocations;  // ... IPC_GRANT's
  std::vector<ipc::IpcLocation> ipc_locations;
  bool ipc_in_flight = false;
  bool dead = false;
  std::string dead_reason;
  std::thread writer;
  std::thread replier;
};

// A connection a sender opened to us.
struct InConn {
  std::string peer;  // the sender's own listening address, from its HELLO
  int fd = -1;
  std::mutex write_mu;  // ACK / NACK from the reader thread, ABORT from user threads
  // Under write_mu. cuda_ipc: a sender may be copying into granted ranges; shutdown() then leaves
  // hanging up to the reader, which waits for the sender's report first.
  bool ipc_granted = false;
  bool closing = false;
  std::atomic<bool> dead{false};
  std::atomic<bool> exited{false};  // the reader returned (or is about to): it may be joined
  std::thread reader;
};

// The next message of a batch, from its cursor (*piece_idx, *offset): up to kMaxPiecesPerMessage
// pieces and max_nbytes bytes, a larger piece spanning several messages. Returns the message's
// pieces (each a slice of one batch piece) in order and advances the cursor past them.
std::vector<Piece> next_message(const std::vector<Piece>& pieces, size_t* piece_idx,
                                uint64_t* offset, uint64_t max_nbytes);

class TcpTransport final : public Transport {
 public:
  TcpTransport(const TransportConfig& config, bool ipc) : config_(config), ipc_(ipc) {
    if (config_.max_message_nbytes == 0) {
      throw std::invalid_argument("max_message_nbytes must be > 0");
    }
    if (config_.cluster_token.size() > kMaxRequestIdLen) {
      throw std::invalid_argument("cluster_token is " +
                                  std::to_string(config_.cluster_token.size()) +
                                  " bytes long; the transfer handshake carries at most " +
                                  std::to_string(kMaxRequestIdLen) + " bytes");
    }
  }

  ~TcpTransport() override { shutdown(); }

  // Transport (see transport.h for what each call promises).
  std::string name() const override { return ipc_ ? "cuda_ipc" : "tcp"; }
  std::string address() const override { return address_; }
  bool supports_device_memory() const override { return ipc_; }
  bool supports_streams() const override { return ipc_; }
  void start(TransportHost* host) override;
  void connect(const std::string& peer, double timeout_s) override;
  bool connected(const std::string& peer) const override;
  void submit(const std::string& peer, SendBatch batch) override;
  void cancel(const std::string& request_id, Ticket ticket, Status status,
              const std::string& reason, bool wait) override;
  void broadcast_abort(const std::string& request_id, const std::string& reason) override;
  void shutdown() override;

 private:
  // ---- sender side (tcp_transport.cpp) ----
  std::shared_ptr<OutConn> find_out(const std::string& peer) const;
  std::vector<std::shared_ptr<OutConn>> live_and_dead_out() const;
  // The TransferError text for a peer that answered our HELLO with a NACK saying `why`.
  std::string handshake_refusal(const std::string& peer, const std::string& why) const;
  void join_out(const std::shared_ptr<OutConn>& conn);
  // A batch is reported once the writer let go of it and its outcome is known. Caller holds
  // conn.mu.
  static bool try_finish_locked(OutConn& conn, const std::shared_ptr<OutBatch>& b);
  // Calls host_->batch_done for each; never under a connection's lock.
  void report(const std::vector<std::shared_ptr<OutBatch>>& finished);
  // Marks the connection dead and fails every batch on it; the batch being written finishes when
  // the writer notices (its send fails once the socket is shut down).
  void kill_out(OutConn& conn, const std::string& reason);
  void writer_loop(std::shared_ptr<OutConn> conn);
  void reply_loop(std::shared_ptr<OutConn> conn);
  // One DATA message from b's cursor (advanced in *piece_idx / *offset); sets *last on its final
  // one.
  IoResult write_tcp_message(OutConn& conn, OutBatch& b, size_t* piece_idx, uint64_t* offset,
                             bool* last);

  // ---- cuda_ipc (tcp_ipc.cpp) ----
  // Sender: one message from b's cursor: the write request, the copy, the report, each answer. A
  // local failure before the request (the ready event, memory that is not on a GPU) fails the batch
  // and writes nothing.
  IoResult write_ipc_message(OutConn& conn, OutBatch& b, ipc::Copier& copier, size_t* piece_idx,
                             uint64_t* offset, bool* last);
  // Sender's reply thread: the rest of an IPC_GRANT frame, handed to the writer.
  IoResult read_ipc_grant(OutConn& conn, const FrameHeader& header, const std::string& text);
  // Receiver: the rest of an IPC_WRITE frame: admits, grants, waits for the sender's report.
  IoResult read_ipc_write(InConn& conn, const FrameHeader& header, const std::string& request_id,
                          const std::string& text);

  // ---- receiver side (tcp_receiver.cpp) ----
  void accept_loop();
  // Joins readers whose connection ended. Caller holds mu_.
  void reap_dead_in_locked();
  // Writes ACK / NACK / HELLO_ACK on an inbound connection (under its write_mu).
  IoResult reply(InConn& conn, FrameType type, uint64_t ticket, const std::string& text);
  // Reads the sender's HELLO and answers it: HELLO_ACK, or a NACK when its cluster token is not
  // ours (then the result is not ok). Sets conn.peer.
  IoResult handshake(InConn& conn);
  void reader_loop(std::shared_ptr<InConn> conn);

  TransportConfig config_;
  const bool ipc_;
  ipc::Mappings mappings_;  // cuda_ipc sender: receivers' allocations mapped here
  std::atomic<uint64_t> next_writer_id_{1};
  TransportHost* host_ = nullptr;
  std::string address_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;

  std::mutex connect_mu_;  // serialises connect() so one peer gets one connection
  mutable std::mutex mu_;  // guards the maps below; never held while calling host_
  std::unordered_map<std::string, std::shared_ptr<OutConn>>
      out_;                                        // live or last connection per peer
  std::vector<std::shared_ptr<OutConn>> all_out_;  // every connection not joined yet
  std::vector<std::shared_ptr<InConn>> in_;        // handshaken, not dead
  std::vector<std::shared_ptr<InConn>> all_in_;    // every reader not joined yet
};

}  // namespace pdserve::transfer::tcp
