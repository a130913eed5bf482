// The transfer engine: one per process (or per rank). It owns the registered memory, the receive
// records (expect), the send tickets, deadlines, byte counters and the completion queue, and drives
// one wire backend through the Transport interface. Every public method is thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "pdserve/transfer/transport.h"
#include "pdserve/transfer/types.h"

namespace pdserve::transfer {

struct EngineConfig {
  std::string backend = "tcp";
  TransportConfig transport;
  double retention_s = 60.0;  // finished tickets / receives (and abort marks) are kept this long
};

class TransferEngine final : private TransportHost {
 public:
  // Starts the backend (for TCP: binds and listens). Throws TransferError if it cannot.
  explicit TransferEngine(const EngineConfig& config);
  ~TransferEngine() override;  // close()
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  const std::string& backend() const { return backend_; }
  // The address peers pass to connect().
  std::string address() const;

  // ---- memory ----
  // Registers [addr, addr + nbytes) for sending from and receiving into. The caller keeps the
  // memory alive until unregister_memory. Regions may not overlap. Returns the region id. Throws
  // std::invalid_argument for empty / overlapping ranges or a device the backend cannot use.
  RegionId register_memory(uint64_t addr, uint64_t nbytes, int device = kHostDevice);
  // Waits for writes in flight into the region, then forgets it. Returns false for unknown ids.
  bool unregister_memory(RegionId region);

  // ---- peers ----
  // Opens the channel to peer ("host:port", the peer's address()). Blocks up to timeout_s.
  void connect(const std::string& peer, double timeout_s = 10.0);
  bool connected(const std::string& peer) const;

  // ---- receiver ----
  // Announces that nbytes will arrive for request_id within timeout_s (0: no deadline; past it the
  // receive ends kTimedOut and the peers are told, as by abort()). Data for a request that was not
  // expected is refused, so call this before the sender starts. With from_peer, only that peer may
  // write and its disconnect fails the request. If request_id was already aborted (e.g. by the
  // sender before this call), the record starts aborted. Throws std::invalid_argument for
  // nbytes == 0 or a request id that is pending or finished here already.
  void expect(const std::string& request_id, uint64_t nbytes, double timeout_s,
              const std::string& from_peer = "");
  // Blocks until the receive is terminal or timeout_s passes (< 0: no limit); returns its state
  // (kPending on timeout). Throws std::invalid_argument for an unknown request id.
  RecvResult wait_recv(const std::string& request_id, double timeout_s = -1.0);
  std::optional<RecvResult> poll_recv(const std::string& request_id) const;

  // ---- sender ----
  // Writes pieces to peer for request_id. Returns at once with a ticket; the batch ends kDone once
  // the receiver acknowledged every byte. The caller keeps the local memory unchanged until the
  // ticket is terminal. A request aborted here or by a peer (also by a peer's receive deadline)
  // ends kAborted at once, without sending. Throws std::invalid_argument for an unknown peer, an
  // empty batch, a zero-length piece, a local range outside registered memory or options the
  // backend cannot honour.
  Ticket send(const std::string& peer, const std::string& request_id, std::vector<Piece> pieces,
              const SendOptions& options = {});
  // Blocks until the ticket is terminal or timeout_s passes (< 0: no limit); kPending on timeout.
  SendResult wait(Ticket ticket, double timeout_s = -1.0);
  std::optional<SendResult> poll(Ticket ticket) const;

  // ---- both ----
  // Aborts request_id here and at every connected peer: the local receive (if any) ends kAborted,
  // local sends of it end kAborted, later data for it is refused. Blocks until no backend thread
  // reads or writes memory for the request, so its blocks may be released when this returns.
  // Aborting an unknown or finished request is allowed (it still tells the peers).
  void abort(const std::string& request_id, const std::string& reason = "aborted");

  EngineStats stats() const;

  // ---- asyncio integration ----
  // A file descriptor that becomes readable when a completion is queued. Only watched tickets and
  // receives are queued (see watch), so work nobody awaits never wakes the awaiting thread (a
  // layer-wise push finishes a ticket per layer while the prefill runs).
  int completion_fd();
  // Queues the ticket's (or the receive's) completion once it is terminal. Call it before checking
  // with poll / poll_recv whether it is terminal already: a completion that came in between is
  // queued too. Watching a ticket or receive that is terminal already queues nothing.
  void watch(Ticket ticket);
  void watch_recv(const std::string& request_id);
  // Returns (and clears) the queued completions and drains completion_fd.
  std::vector<Completion> drain_completions();

  // Fails everything pending, stops the backend and its threads. Idempotent.
  void close();

 private:
  using Clock = std::chrono::steady_clock;

  struct Region {
    RegionId id;
    uint64_t addr;
    uint64_t nbytes;
    int device;
  };
  struct RecvRecord {
    RecvResult result;
    std::string from_peer;
    std::set<std::string> peers_seen;
    uint64_t nbytes_admitted = 0;
    uint32_t num_inflight = 0;  // admitted messages still being written
    bool settled = false;       // result.status terminal and num_inflight == 0
    Clock::time_point start;
    Clock::time_point last_byte;
    std::optional<Clock::time_point> deadline;
    Clock::time_point settled_at;
  };
  struct TicketRecord {
    SendResult result;
    Clock::time_point start;
    std::optional<Clock::time_point> deadline;
    bool cancel_requested = false;
    Clock::time_point settled_at;
  };

  // TransportHost
  Admission admit(const std::string& request_id, const std::string& peer, const WirePiece* pieces,
                  size_t num_pieces, uint64_t nbytes) override;
  void landed(Admission admission, const std::string& peer, uint64_t nbytes,
              const std::string& error) override;
  void inbound_lost(const std::string& peer, const std::string& reason) override;
  void batch_done(Ticket ticket, Status status, const std::string& error) override;
  void remote_abort(const std::string& request_id, const std::string& reason) override;
  std::shared_lock<std::shared_mutex> local_memory_guard() override;

  bool range_registered(uint64_t addr, uint64_t nbytes) const;  // caller holds regions_mu_
  // Marks a pending receive terminal; settles it when nothing is in flight. Caller holds recv_mu_.
  void fail_recv_locked(RecvRecord& record, Status status, const std::string& error);
  void settle_recv_locked(RecvRecord& record);
  // Records that request_id was aborted before it was expected here. Caller holds recv_mu_.
  void add_abort_mark_locked(const std::string& request_id, const std::string& error);
  void push_completion(Completion completion);
  void reaper_loop();

  const std::string backend_;
  const double retention_s_;
  std::unique_ptr<Transport> transport_;

  // Shared while region memory is read or written (and while checking ranges); unique to
  // (un)register, which therefore waits for the message in flight (cuda_ipc: two round trips and
  // the copy; a receiver keeps granted ranges while a connected sender stays silent).
  mutable std::shared_mutex regions_mu_;
  std::map<uint64_t, Region> regions_by_addr_;
  RegionId next_region_id_ = 1;

  // Lock order: regions_mu_ (shared) -> recv_mu_ -> stats_mu_ -> completions_mu_, and
  // tickets_mu_ -> stats_mu_ -> completions_mu_. None is held while calling into the transport.
  mutable std::mutex recv_mu_;
  std::condition_variable recv_cv_;
  std::unordered_map<std::string, RecvRecord> recvs_;
  // Deadlines and settle order, so the reaper touches only what expired: O(expired), not O(all).
  std::multimap<Clock::time_point, std::string> recv_deadlines_;
  std::deque<std::pair<Clock::time_point, std::string>> recvs_settled_;
  uint64_t num_pending_recvs_ = 0;  // == records with !settled
  uint64_t recvs_done_ = 0, recvs_timed_out_ = 0, recvs_aborted_ = 0, recvs_failed_ = 0;
  double recv_seconds_ = 0.0;

  mutable std::mutex tickets_mu_;
  std::condition_variable tickets_cv_;
  std::unordered_map<Ticket, TicketRecord> tickets_;
  std::multimap<Clock::time_point, Ticket> ticket_deadlines_;
  std::deque<std::pair<Clock::time_point, Ticket>> tickets_settled_;
  uint64_t num_pending_tickets_ = 0;  // == records with status kPending
  Ticket next_ticket_ = 1;

  mutable std::mutex stats_mu_;
  std::map<std::string, PeerStats> peer_stats_;

  std::mutex completions_mu_;
  int completion_fd_ = -1;
  std::vector<Completion> completions_;
  std::set<Ticket> watched_tickets_;
  std::set<std::string> watched_recvs_;

  std::mutex reaper_mu_;
  std::condition_variable reaper_cv_;
  bool closing_ = false;
  std::thread reaper_;
  std::once_flag close_once_;
};

}  // namespace pdserve::transfer
