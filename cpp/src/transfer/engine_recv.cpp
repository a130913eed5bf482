// The transfer engine's receive side: expect() records, their settling (done, timed out, aborted,
// failed), and the TransportHost calls a backend makes while data arrives (admit, landed, lost).
// Invariant: a record settles only when no admitted message is still being written into memory.
#include <stdexcept>

#include "engine_text.h"
#include "pdserve/transfer/engine.h"

namespace pdserve::transfer {

void TransferEngine::expect(const std::string& request_id, uint64_t nbytes, double timeout_s,
                            const std::string& from_peer) {
  if (request_id.empty()) throw std::invalid_argument("expect: request_id must not be empty");
  if (request_id.size() > 1024) {
    throw std::invalid_argument("expect: request_id longer than 1024 B");
  }
  if (nbytes == 0) throw std::invalid_argument("expect: nbytes must be > 0 for " + request_id);
  if (timeout_s < 0) throw std::invalid_argument("expect: timeout_s must be >= 0 (0: none)");
  {
    std::lock_guard<std::mutex> lk(reaper_mu_);
    if (closing_) throw TransferError("transfer engine is closed");
  }
  std::lock_guard<std::mutex> lk(recv_mu_);
  auto now = Clock::now();
  auto it = recvs_.find(request_id);
  if (it != recvs_.end()) {
    RecvRecord& old = it->second;
    if (old.result.status == Status::kAborted && old.result.nbytes_expected == 0) {
      // Aborted before it was expected (the abort raced ahead): the receive starts aborted.
      old.result.nbytes_expected = nbytes;
      old.start = now;
      return;
    }
    throw std::invalid_argument("expect: request '" + request_id + "' is already " +
                                status_name(old.result.status) + " on this receiver");
  }
  RecvRecord& rec = recvs_[request_id];
  rec.result.request_id = request_id;
  rec.result.nbytes_expected = nbytes;
  rec.from_peer = from_peer;
  rec.start = now;
  ++num_pending_recvs_;
  if (timeout_s > 0) {
    rec.deadline =
        now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
    recv_deadlines_.emplace(*rec.deadline, request_id);
  }
}

RecvResult TransferEngine::wait_recv(const std::string& request_id, double timeout_s) {
  std::unique_lock<std::mutex> lk(recv_mu_);
  auto settled = [&] {
    auto it = recvs_.find(request_id);
    if (it == recvs_.end()) {
      throw std::invalid_argument("wait_recv: request '" + request_id +
                                  "' was not expected here (or finished over retention_s ago)");
    }
    return it->second.settled;
  };
  if (timeout_s < 0) {
    recv_cv_.wait(lk, settled);
  } else {
    recv_cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), settled);
  }
  RecvResult result = recvs_.at(request_id).result;
  if (!recvs_.at(request_id).settled) result.status = Status::kPending;
  return result;
}

std::optional<RecvResult> TransferEngine::poll_recv(const std::string& request_id) const {
  std::lock_guard<std::mutex> lk(recv_mu_);
  auto it = recvs_.find(request_id);
  if (it == recvs_.end()) return std::nullopt;
  RecvResult result = it->second.result;
  if (!it->second.settled) result.status = Status::kPending;
  return result;
}

void TransferEngine::fail_recv_locked(RecvRecord& record, Status status, const std::string& error) {
  if (record.result.status != Status::kPending) return;
  record.result.status = status;
  record.result.error = error;
  if (record.num_inflight == 0) settle_recv_locked(record);
}

void TransferEngine::settle_recv_locked(RecvRecord& record) {
  if (record.settled) return;
  record.settled = true;
  record.settled_at = Clock::now();
  recvs_settled_.emplace_back(record.settled_at, record.result.request_id);
  --num_pending_recvs_;
  record.result.seconds = seconds_between(record.start, record.settled_at);
  switch (record.result.status) {
    case Status::kDone:
      ++recvs_done_;
      recv_seconds_ += seconds_between(record.start, record.last_byte);
      break;
    case Status::kTimedOut:
      ++recvs_timed_out_;
      break;
    case Status::kAborted:
      ++recvs_aborted_;
      break;
    default:
      ++recvs_failed_;
  }
  Completion c;
  c.is_send = false;
  c.recv = record.result;
  push_completion(std::move(c));
  recv_cv_.notify_all();
}

void TransferEngine::add_abort_mark_locked(const std::string& request_id,
                                           const std::string& error) {
  RecvRecord& rec = recvs_[request_id];
  rec.result.request_id = request_id;
  rec.result.status = Status::kAborted;
  rec.result.error = error;
  rec.start = Clock::now();
  rec.settled = true;
  rec.settled_at = rec.start;
  recvs_settled_.emplace_back(rec.settled_at, request_id);
}

Admission TransferEngine::admit(const std::string& request_id, const std::string& peer,
                                const WirePiece* pieces, size_t num_pieces, uint64_t nbytes) {
  Admission a;
  a.request_id = request_id;
  std::shared_lock<std::shared_mutex> regions(regions_mu_);
  std::string range_error;
  for (size_t i = 0; i < num_pieces && range_error.empty(); ++i) {
    const WirePiece& p = pieces[i];
    if (p.nbytes == 0 || p.remote_addr + p.nbytes < p.remote_addr ||
        !range_registered(p.remote_addr, p.nbytes)) {
      range_error = "destination " + range_text(p.remote_addr, p.nbytes) +
                    " is not inside memory registered on the receiver";
    }
  }
  {
    std::lock_guard<std::mutex> lk(recv_mu_);
    auto it = recvs_.find(request_id);
    if (it == recvs_.end()) {
      a.error = "request '" + request_id +
                "' is not expected here (the receiver must call expect() before data arrives)";
    } else {
      RecvRecord& rec = it->second;
      if (rec.result.status != Status::kPending) {
        a.error = "request '" + request_id + "' is " + status_name(rec.result.status) +
                  (rec.result.error.empty() ? "" : " (" + rec.result.error + ")");
      } else if (!rec.from_peer.empty() && rec.from_peer != peer) {
        a.error = "request '" + request_id + "' accepts data only from " + rec.from_peer +
                  ", not from " + peer;
      } else if (!range_error.empty()) {
        a.error = "request '" + request_id + "': " + range_error;
        fail_recv_locked(rec, Status::kFailed, a.error);
      } else if (nbytes > rec.result.nbytes_expected - rec.nbytes_admitted) {
        a.error = "request '" + request_id + "' expects " +
                  std::to_string(rec.result.nbytes_expected) + " B; " +
                  std::to_string(rec.nbytes_admitted) + " B arrived already and " +
                  std::to_string(nbytes) + " B more would overflow";
        fail_recv_locked(rec, Status::kFailed, a.error);
      } else {
        rec.nbytes_admitted += nbytes;
        rec.num_inflight += 1;
        rec.peers_seen.insert(peer);
        a.ok = true;
        a.regions_guard = std::move(regions);
        return a;
      }
    }
  }
  std::lock_guard<std::mutex> lk(stats_mu_);
  peer_stats_[peer].bytes_rejected += nbytes;
  return a;
}

void TransferEngine::landed(Admission admission, const std::string& peer, uint64_t nbytes,
                            const std::string& error) {
  {
    std::lock_guard<std::mutex> lk(recv_mu_);
    RecvRecord& rec = recvs_.at(admission.request_id);  // unsettled records are never purged
    rec.num_inflight -= 1;
    if (error.empty()) {
      {
        // Counted before the receive can settle, so stats() after wait_recv() includes it.
        std::lock_guard<std::mutex> slk(stats_mu_);
        peer_stats_[peer].bytes_received += nbytes;
      }
      rec.result.nbytes_received += nbytes;
      rec.last_byte = Clock::now();
      if (rec.result.status == Status::kPending &&
          rec.result.nbytes_received == rec.result.nbytes_expected) {
        rec.result.status = Status::kDone;
      }
    } else {
      fail_recv_locked(rec, Status::kFailed, error);
    }
    if (rec.result.status != Status::kPending && rec.num_inflight == 0) settle_recv_locked(rec);
  }
  admission.regions_guard = {};
}

void TransferEngine::inbound_lost(const std::string& peer, const std::string& reason) {
  std::lock_guard<std::mutex> lk(recv_mu_);
  for (auto& [rid, rec] : recvs_) {
    if (rec.result.status != Status::kPending) continue;
    if (rec.from_peer == peer || rec.peers_seen.count(peer) != 0) {
      fail_recv_locked(rec, Status::kFailed, "peer " + peer + " disconnected: " + reason);
    }
  }
}

}  // namespace pdserve::transfer
