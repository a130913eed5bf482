// The transfer engine's bookkeeping, everything but the receive side (engine_recv.cpp): registered
// regions, peers, send tickets, aborts, deadlines, counters and the completion queue. Wire work is
// delegated to the Transport backend, which reports back through the TransportHost methods.
#include "pdserve/transfer/engine.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <stdexcept>

#include "engine_text.h"

namespace pdserve::transfer {
namespace {

void add_to(PeerStats& into, const PeerStats& s) {
  into.bytes_sent += s.bytes_sent;
  into.bytes_received += s.bytes_received;
  into.bytes_rejected += s.bytes_rejected;
  into.tickets_done += s.tickets_done;
  into.tickets_failed += s.tickets_failed;
  into.send_seconds += s.send_seconds;
}

}  // namespace

TransferEngine::TransferEngine(const EngineConfig& config)
    : backend_(config.backend),
      retention_s_(config.retention_s),
      transport_(make_transport(config.backend, config.transport)) {
  transport_->start(this);
  reaper_ = std::thread([this] { reaper_loop(); });
}

TransferEngine::~TransferEngine() {
  close();
  if (completion_fd_ >= 0) ::close(completion_fd_);
}

std::string TransferEngine::address() const { return transport_->address(); }

// ---------------------------------------------------------------- memory

RegionId TransferEngine::register_memory(uint64_t addr, uint64_t nbytes, int device) {
  if (nbytes == 0) throw std::invalid_argument("register_memory: nbytes must be > 0");
  if (addr == 0) throw std::invalid_argument("register_memory: addr must not be 0");
  if (addr + nbytes < addr) {
    throw std::invalid_argument("register_memory: range " + hex(addr) + " + " +
                                std::to_string(nbytes) + " B wraps around");
  }
  if (device != kHostDevice && !transport_->supports_device_memory()) {
    throw std::invalid_argument(
        "register_memory: the " + backend_ +
        " backend moves host memory only (device=-1); got device=" + std::to_string(device));
  }
  std::unique_lock<std::shared_mutex> lk(regions_mu_);
  auto next = regions_by_addr_.lower_bound(addr);
  if (next != regions_by_addr_.end() && next->second.addr < addr + nbytes) {
    throw std::invalid_argument("register_memory: " + range_text(addr, nbytes) +
                                " overlaps region " + std::to_string(next->second.id) + " " +
                                range_text(next->second.addr, next->second.nbytes));
  }
  if (next != regions_by_addr_.begin()) {
    auto prev = std::prev(next);
    if (prev->second.addr + prev->second.nbytes > addr) {
      throw std::invalid_argument("register_memory: " + range_text(addr, nbytes) +
                                  " overlaps region " + std::to_string(prev->second.id) + " " +
                                  range_text(prev->second.addr, prev->second.nbytes));
    }
  }
  RegionId id = next_region_id_++;
  regions_by_addr_[addr] = Region{id, addr, nbytes, device};
  return id;
}

bool TransferEngine::unregister_memory(RegionId region) {
  std::unique_lock<std::shared_mutex> lk(regions_mu_);  // waits for reads/writes in flight
  for (auto it = regions_by_addr_.begin(); it != regions_by_addr_.end(); ++it) {
    if (it->second.id == region) {
      regions_by_addr_.erase(it);
      return true;
    }
  }
  return false;
}

bool TransferEngine::range_registered(uint64_t addr, uint64_t nbytes) const {
  auto it = regions_by_addr_.upper_bound(addr);
  if (it == regions_by_addr_.begin()) return false;
  const Region& r = std::prev(it)->second;
  uint64_t offset = addr - r.addr;  // addr >= r.addr here
  return offset < r.nbytes && nbytes <= r.nbytes - offset;
}

std::shared_lock<std::shared_mutex> TransferEngine::local_memory_guard() {
  return std::shared_lock<std::shared_mutex>(regions_mu_);
}

// ---------------------------------------------------------------- peers

void TransferEngine::connect(const std::string& peer, double timeout_s) {
  {
    std::lock_guard<std::mutex> lk(reaper_mu_);
    if (closing_) throw TransferError("transfer engine is closed");
  }
  transport_->connect(peer, timeout_s);
  std::lock_guard<std::mutex> lk(stats_mu_);
  peer_stats_[peer];  // a known peer from now on (send() refuses unknown ones)
}

bool TransferEngine::connected(const std::string& peer) const {
  return transport_->connected(peer);
}

// ---------------------------------------------------------------- sender

Ticket TransferEngine::send(const std::string& peer, const std::string& request_id,
                            std::vector<Piece> pieces, const SendOptions& options) {
  if (request_id.empty()) throw std::invalid_argument("send: request_id must not be empty");
  if (request_id.size() > 1024) throw std::invalid_argument("send: request_id longer than 1024 B");
  if (pieces.empty()) throw std::invalid_argument("send: no pieces for " + request_id);
  if (options.timeout_s < 0) throw std::invalid_argument("send: timeout_s must be >= 0 (0: none)");
  if ((options.stream != 0 || options.ready_event != 0) && !transport_->supports_streams()) {
    throw std::invalid_argument("send: the " + backend_ +
                                " backend takes no CUDA stream or event (pass 0)");
  }
  {
    std::lock_guard<std::mutex> lk(reaper_mu_);
    if (closing_) throw TransferError("transfer engine is closed");
  }
  {
    std::lock_guard<std::mutex> lk(stats_mu_);
    if (peer_stats_.find(peer) == peer_stats_.end()) {
      throw std::invalid_argument("send: not connected to peer '" + peer +
                                  "' (call connect(peer) first)");
    }
  }
  uint64_t total = 0;
  {
    std::shared_lock<std::shared_mutex> lk(regions_mu_);
    for (size_t i = 0; i < pieces.size(); ++i) {
      const Piece& p = pieces[i];
      if (p.nbytes == 0) {
        throw std::invalid_argument("send: piece " + std::to_string(i) + " of " + request_id +
                                    " has nbytes == 0");
      }
      if (p.local_addr + p.nbytes < p.local_addr || !range_registered(p.local_addr, p.nbytes)) {
        throw std::invalid_argument("send: piece " + std::to_string(i) + " of " + request_id +
                                    ": local range " + range_text(p.local_addr, p.nbytes) +
                                    " is not inside registered memory");
      }
      total += p.nbytes;
    }
  }
  std::string aborted;  // the request was aborted here or by a peer: fail without sending
  {
    std::lock_guard<std::mutex> lk(recv_mu_);
    auto it = recvs_.find(request_id);
    if (it != recvs_.end() && it->second.result.status == Status::kAborted) {
      aborted = "request '" + request_id + "' was aborted (" + it->second.result.error + ")";
    }
  }
  auto now = Clock::now();
  Ticket ticket;
  {
    std::lock_guard<std::mutex> lk(tickets_mu_);
    ticket = next_ticket_++;
    TicketRecord& rec = tickets_[ticket];
    rec.result.ticket = ticket;
    rec.result.request_id = request_id;
    rec.result.peer = peer;
    rec.result.nbytes = total;
    rec.start = now;
    ++num_pending_tickets_;
    if (options.timeout_s > 0) {
      rec.deadline = now + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(options.timeout_s));
      ticket_deadlines_.emplace(*rec.deadline, ticket);
    }
  }
  SendBatch batch;
  batch.ticket = ticket;
  batch.request_id = request_id;
  batch.pieces = std::move(pieces);
  batch.nbytes = total;
  batch.options = options;
  if (aborted.empty()) {
    transport_->submit(peer, std::move(batch));
  } else {
    batch_done(ticket, Status::kAborted, aborted);
  }
  return ticket;
}

SendResult TransferEngine::wait(Ticket ticket, double timeout_s) {
  std::unique_lock<std::mutex> lk(tickets_mu_);
  auto done = [&] {
    auto it = tickets_.find(ticket);
    if (it == tickets_.end()) {
      throw std::invalid_argument("wait: unknown ticket " + std::to_string(ticket) +
                                  " (or finished over retention_s ago)");
    }
    return it->second.result.status != Status::kPending;
  };
  if (timeout_s < 0) {
    tickets_cv_.wait(lk, done);
  } else {
    tickets_cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), done);
  }
  return tickets_.at(ticket).result;
}

std::optional<SendResult> TransferEngine::poll(Ticket ticket) const {
  std::lock_guard<std::mutex> lk(tickets_mu_);
  auto it = tickets_.find(ticket);
  if (it == tickets_.end()) return std::nullopt;
  return it->second.result;
}

// ---------------------------------------------------------------- both sides

void TransferEngine::abort(const std::string& request_id, const std::string& reason) {
  if (request_id.empty()) throw std::invalid_argument("abort: request_id must not be empty");
  {
    std::unique_lock<std::mutex> lk(recv_mu_);
    auto it = recvs_.find(request_id);
    if (it == recvs_.end()) {
      // Remember the abort so that a late expect() starts aborted and late data is refused.
      add_abort_mark_locked(request_id, reason);
    } else {
      fail_recv_locked(it->second, Status::kAborted, reason);
      // Writes in flight finish (bounded by one message) before the caller may reuse the blocks.
      recv_cv_.wait(lk, [&] {
        auto found = recvs_.find(request_id);
        return found == recvs_.end() || found->second.settled;
      });
    }
  }
  transport_->cancel(request_id, 0, Status::kAborted, reason, /*wait=*/true);
  transport_->broadcast_abort(request_id, reason);
}

EngineStats TransferEngine::stats() const {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lk(stats_mu_);
    s.peers = peer_stats_;
  }
  for (const auto& [peer, ps] : s.peers) add_to(s.total, ps);
  {
    std::lock_guard<std::mutex> lk(recv_mu_);
    s.recvs_done = recvs_done_;
    s.recvs_timed_out = recvs_timed_out_;
    s.recvs_aborted = recvs_aborted_;
    s.recvs_failed = recvs_failed_;
    s.recv_seconds = recv_seconds_;
    s.num_pending_recvs = num_pending_recvs_;
  }
  {
    std::lock_guard<std::mutex> lk(tickets_mu_);
    s.num_pending_tickets = num_pending_tickets_;
  }
  {
    std::shared_lock<std::shared_mutex> lk(regions_mu_);
    s.num_regions = regions_by_addr_.size();
  }
  return s;
}

// ---------------------------------------------------------------- completions

int TransferEngine::completion_fd() {
  std::lock_guard<std::mutex> lk(completions_mu_);
  if (completion_fd_ < 0) {
    completion_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (completion_fd_ < 0) throw TransferError("eventfd failed: errno " + std::to_string(errno));
  }
  return completion_fd_;
}

void TransferEngine::watch(Ticket ticket) {
  // A ticket that is terminal already is never pushed again: do not keep its mark.
  std::lock_guard<std::mutex> tlk(tickets_mu_);
  auto it = tickets_.find(ticket);
  if (it == tickets_.end() || it->second.result.status != Status::kPending) return;
  std::lock_guard<std::mutex> lk(completions_mu_);  // tickets_mu_ -> completions_mu_
  watched_tickets_.insert(ticket);
}

void TransferEngine::watch_recv(const std::string& request_id) {
  std::lock_guard<std::mutex> rlk(recv_mu_);
  auto it = recvs_.find(request_id);
  if (it == recvs_.end() || it->second.settled) return;
  std::lock_guard<std::mutex> lk(completions_mu_);  // recv_mu_ -> completions_mu_
  watched_recvs_.insert(request_id);
}

std::vector<Completion> TransferEngine::drain_completions() {
  std::lock_guard<std::mutex> lk(completions_mu_);
  if (completion_fd_ >= 0) {
    uint64_t count = 0;
    ssize_t n = ::read(completion_fd_, &count, sizeof(count));  // resets the counter
    (void)n;
  }
  std::vector<Completion> out;
  out.swap(completions_);
  return out;
}

void TransferEngine::push_completion(Completion completion) {
  std::lock_guard<std::mutex> lk(completions_mu_);
  bool watched = completion.is_send ? watched_tickets_.erase(completion.send.ticket) > 0
                                    : watched_recvs_.erase(completion.recv.request_id) > 0;
  if (!watched || completion_fd_ < 0) return;
  completions_.push_back(std::move(completion));
  uint64_t one = 1;
  ssize_t n = ::write(completion_fd_, &one, sizeof(one));
  (void)n;
}

// ---------------------------------------------------------------- deadlines, close

void TransferEngine::reaper_loop() {
  std::unique_lock<std::mutex> lk(reaper_mu_);
  while (!closing_) {
    reaper_cv_.wait_for(lk, std::chrono::milliseconds(10));
    if (closing_) break;
    lk.unlock();
    auto now = Clock::now();
    auto retention =
        std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(retention_s_));
    std::vector<std::pair<std::string, std::string>> timed_out;  // (request id, why)
    {
      std::lock_guard<std::mutex> rlk(recv_mu_);
      while (!recv_deadlines_.empty() && recv_deadlines_.begin()->first <= now) {
        auto [deadline, rid] = *recv_deadlines_.begin();
        recv_deadlines_.erase(recv_deadlines_.begin());
        auto it = recvs_.find(rid);
        if (it == recvs_.end() || it->second.deadline != deadline) continue;
        RecvRecord& rec = it->second;
        if (rec.result.status != Status::kPending) continue;
        std::string why = "expected " + std::to_string(rec.result.nbytes_expected) +
                          " B, received " + std::to_string(rec.result.nbytes_received) +
                          " B before the deadline";
        fail_recv_locked(rec, Status::kTimedOut, why);
        timed_out.emplace_back(rid, "receive timed out: " + why);
      }
      while (!recvs_settled_.empty() && now - recvs_settled_.front().first > retention) {
        auto it = recvs_.find(recvs_settled_.front().second);
        if (it != recvs_.end() && it->second.settled &&
            it->second.settled_at == recvs_settled_.front().first) {
          recvs_.erase(it);
        }
        recvs_settled_.pop_front();
      }
    }
    std::vector<Ticket> expired;
    {
      std::lock_guard<std::mutex> tlk(tickets_mu_);
      while (!ticket_deadlines_.empty() && ticket_deadlines_.begin()->first <= now) {
        Ticket ticket = ticket_deadlines_.begin()->second;
        ticket_deadlines_.erase(ticket_deadlines_.begin());
        auto it = tickets_.find(ticket);
        if (it == tickets_.end() || it->second.result.status != Status::kPending) continue;
        it->second.cancel_requested = true;
        expired.push_back(ticket);
      }
      while (!tickets_settled_.empty() && now - tickets_settled_.front().first > retention) {
        tickets_.erase(tickets_settled_.front().second);
        tickets_settled_.pop_front();
      }
    }
    for (Ticket ticket : expired) {
      transport_->cancel("", ticket, Status::kTimedOut, "not acknowledged before the deadline",
                         /*wait=*/false);
    }
    // The request is dead here: tell the senders, so they stop pushing (and fail new pushes) now
    // rather than when their next message is refused.
    for (const auto& [rid, why] : timed_out) transport_->broadcast_abort(rid, why);
    lk.lock();
  }
}

void TransferEngine::close() {
  std::call_once(close_once_, [this] {
    {
      std::lock_guard<std::mutex> lk(reaper_mu_);
      closing_ = true;
    }
    reaper_cv_.notify_all();
    if (reaper_.joinable()) reaper_.join();
    transport_->shutdown();  // fails every batch and ends every inbound connection
    std::lock_guard<std::mutex> lk(recv_mu_);
    for (auto& [rid, rec] : recvs_)
      fail_recv_locked(rec, Status::kFailed, "transfer engine closed");
  });
}

// ---------------------------------------------------------------- TransportHost

void TransferEngine::batch_done(Ticket ticket, Status status, const std::string& error) {
  SendResult result;
  {
    std::lock_guard<std::mutex> lk(tickets_mu_);
    auto it = tickets_.find(ticket);
    if (it == tickets_.end() || it->second.result.status != Status::kPending) return;
    TicketRecord& rec = it->second;
    rec.settled_at = Clock::now();
    tickets_settled_.emplace_back(rec.settled_at, ticket);
    --num_pending_tickets_;
    rec.result.status = status;
    rec.result.error = error;
    rec.result.seconds = seconds_between(rec.start, rec.settled_at);
    result = rec.result;
    {
      // Counted before waiters wake, so stats() after wait() includes this ticket.
      std::lock_guard<std::mutex> slk(stats_mu_);
      PeerStats& ps = peer_stats_[result.peer];
      if (status == Status::kDone) {
        ps.bytes_sent += result.nbytes;
        ps.tickets_done += 1;
        ps.send_seconds += result.seconds;
      } else {
        ps.tickets_failed += 1;
      }
    }
    tickets_cv_.notify_all();
  }
  Completion c;
  c.is_send = true;
  c.send = std::move(result);
  push_completion(std::move(c));
}

void TransferEngine::remote_abort(const std::string& request_id, const std::string& reason) {
  std::string why = "aborted by peer: " + reason;
  {
    std::lock_guard<std::mutex> lk(recv_mu_);
    auto it = recvs_.find(request_id);
    if (it == recvs_.end()) {
      add_abort_mark_locked(request_id, why);
    } else {
      fail_recv_locked(it->second, Status::kAborted, why);
    }
  }
  transport_->cancel(request_id, 0, Status::kAborted, why, /*wait=*/false);
}

}  // namespace pdserve::transfer
