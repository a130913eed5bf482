// The TCP backend, sender side and lifecycle: one connection per (sender, receiver) pair, opened by
// the sender, with a writer thread (batches -> framed messages, gathered from local memory with
// sendmsg) and a reply thread (ACK / NACK / ABORT). The receiver side is in tcp_receiver.cpp.
#include "tcp_transport.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "backends.h"

namespace pdserve::transfer {
namespace tcp {

void TcpTransport::start(TransportHost* host) {
  if (ipc_) cuda::Driver::get();  // no GPU driver: fail now, with the reason, not at the first send
  host_ = host;
  int port = 0;
  listen_fd_ = listen_on(config_.host, config_.port, &port);
  std::string advertised =
      config_.host.empty() || config_.host == "0.0.0.0" ? "127.0.0.1" : config_.host;
  address_ = advertised + ":" + std::to_string(port);
  acceptor_ = std::thread([this] { accept_loop(); });
}

void TcpTransport::connect(const std::string& peer, double timeout_s) {
  std::lock_guard<std::mutex> connecting(connect_mu_);
  std::shared_ptr<OutConn> old;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) throw TransferError("transfer engine is closed");
    auto it = out_.find(peer);
    if (it != out_.end()) {
      std::lock_guard<std::mutex> clk(it->second->mu);
      if (!it->second->dead) return;
      old = it->second;
    }
  }
  std::string host;
  int port = 0;
  split_address(peer, &host, &port);
  int fd = connect_to(host, port, timeout_s);
  IoResult r = write_control_frame(fd, FrameType::kHello, 0, config_.cluster_token, address_,
                                   timeout_s, stop_);
  FrameHeader header;
  std::string rid, text;
  if (r.ok) r = read_frame_head(fd, &header, &rid, &text, timeout_s, stop_, false);
  if (r.ok && header.type == static_cast<uint8_t>(FrameType::kNack)) {
    ::close(fd);
    throw TransferError(handshake_refusal(peer, text));
  }
  if (r.ok && header.type != static_cast<uint8_t>(FrameType::kHelloAck)) {
    r = {false, "protocol error: expected HELLO_ACK"};
  }
  if (!r.ok) {
    ::close(fd);
    throw TransferError("handshake with peer " + peer + " failed: " + r.error);
  }
  auto conn = std::make_shared<OutConn>();
  conn->peer = peer;
  conn->fd = fd;
  conn->writer = std::thread([this, conn] { writer_loop(conn); });
  conn->replier = std::thread([this, conn] { reply_loop(conn); });
  {
    std::lock_guard<std::mutex> lk(mu_);
    out_[peer] = conn;
    all_out_.push_back(conn);
  }
  if (old) join_out(old);
}

std::string TcpTransport::handshake_refusal(const std::string& peer, const std::string& why) const {
  if (why.rfind(kTokenMismatch, 0) != 0) {
    return "peer " + peer + " refused the connection: " + why;
  }
  return "peer " + peer + " refused the connection: the cluster tokens differ (" +
         (config_.cluster_token.empty() ? "this engine has none, the peer requires one"
                                        : "this engine's token is not the peer's") +
         "); set the same --cluster-token / PDSERVE_CLUSTER_TOKEN on every instance";
}

bool TcpTransport::connected(const std::string& peer) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = out_.find(peer);
  if (it == out_.end()) return false;
  std::lock_guard<std::mutex> clk(it->second->mu);
  return !it->second->dead;
}

void TcpTransport::submit(const std::string& peer, SendBatch batch) {
  std::shared_ptr<OutConn> conn = find_out(peer);
  Ticket ticket = batch.ticket;
  std::string error = "not connected to peer " + peer + " (call connect first)";
  auto b = std::make_shared<OutBatch>();
  if (ipc_ && batch.options.ready_event != 0) {
    // On the caller's thread, while its event is alive: wait for it through an event of ours.
    cuda::Driver& driver = cuda::Driver::get();
    cuda::Error e = driver.device_of(batch.pieces.front().local_addr, &b->ready_device);
    if (e.ok()) {
      e = driver.chain_event(b->ready_device,
                             reinterpret_cast<cuda::CUevent>(batch.options.ready_event),
                             &b->ready_event);
    }
    if (!e.ok()) {
      host_->batch_done(ticket, Status::kFailed,
                        "cannot wait for the batch's ready event: " + e.text);
      return;
    }
  }
  if (conn) {
    std::lock_guard<std::mutex> lk(conn->mu);
    if (!conn->dead) {
      b->batch = std::move(batch);
      conn->queue.push_back(b);
      conn->batches[ticket] = b;
      conn->cv.notify_all();
      return;
    }
    error = "connection to peer " + peer + " is lost: " + conn->dead_reason;
  }
  host_->batch_done(ticket, Status::kFailed, error);
}

void TcpTransport::cancel(const std::string& request_id, Ticket ticket, Status status,
                          const std::string& reason, bool wait) {
  auto matches = [&](const OutBatch& b) {
    return ticket != 0 ? b.batch.ticket == ticket : b.batch.request_id == request_id;
  };
  for (const auto& conn : live_and_dead_out()) {
    std::vector<std::shared_ptr<OutBatch>> finished;
    {
      std::unique_lock<std::mutex> lk(conn->mu);
      std::vector<std::shared_ptr<OutBatch>> written;  // fully sent, awaiting the reply
      for (auto& [t, b] : conn->batches) {
        if (!matches(*b)) continue;
        b->cancelled = true;
        b->set_outcome(status, reason);
        if (b->writing_done) written.push_back(b);
      }
      for (auto& b : written) {
        if (try_finish_locked(*conn, b)) finished.push_back(b);
      }
      // Batches not being written right now leave the queue at once.
      for (auto it = conn->queue.begin(); it != conn->queue.end();) {
        OutBatch* b = it->get();
        if (matches(*b) && b != conn->writing) {
          b->writing_done = true;
          if (try_finish_locked(*conn, *it)) finished.push_back(*it);
          it = conn->queue.erase(it);
        } else {
          ++it;
        }
      }
      if (wait) {
        conn->cv.wait(lk, [&] { return conn->writing == nullptr || !matches(*conn->writing); });
      }
    }
    report(finished);
  }
}

void TcpTransport::broadcast_abort(const std::string& request_id, const std::string& reason) {
  std::vector<std::shared_ptr<OutConn>> outs;
  std::vector<std::shared_ptr<InConn>> ins;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& [peer, conn] : out_) outs.push_back(conn);
    ins = in_;
  }
  for (auto& conn : outs) {
    std::lock_guard<std::mutex> lk(conn->mu);
    if (conn->dead) continue;
    conn->aborts.emplace_back(request_id, reason);
    conn->cv.notify_all();
  }
  for (auto& conn : ins) {
    if (conn->dead) continue;
    std::lock_guard<std::mutex> wlk(conn->write_mu);
    // Best effort: a failure here is noticed by the connection's reader.
    write_control_frame(conn->fd, FrameType::kAbort, 0, request_id, reason, config_.stall_timeout_s,
                        stop_);
  }
}

void TcpTransport::shutdown() {
  if (stop_.exchange(true)) return;
  if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  std::vector<std::shared_ptr<OutConn>> outs;
  std::vector<std::shared_ptr<InConn>> ins;
  {
    std::lock_guard<std::mutex> lk(mu_);
    outs = all_out_;
    ins = all_in_;
  }
  for (auto& conn : outs) kill_out(*conn, "transfer engine closed");
  for (auto& conn : ins) {
    std::lock_guard<std::mutex> wlk(conn->write_mu);
    conn->closing = true;
    if (!conn->ipc_granted) ::shutdown(conn->fd, SHUT_RDWR);  // else its reader hangs up
  }
  for (auto& conn : outs) join_out(conn);
  for (auto& conn : ins) {
    if (conn->reader.joinable()) conn->reader.join();
    ::close(conn->fd);
  }
  std::lock_guard<std::mutex> lk(mu_);
  out_.clear();
  in_.clear();
  all_out_.clear();
  all_in_.clear();
}

std::shared_ptr<OutConn> TcpTransport::find_out(const std::string& peer) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = out_.find(peer);
  return it == out_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<OutConn>> TcpTransport::live_and_dead_out() const {
  std::lock_guard<std::mutex> lk(mu_);
  return all_out_;
}

void TcpTransport::join_out(const std::shared_ptr<OutConn>& conn) {
  if (conn->writer.joinable()) conn->writer.join();
  if (conn->replier.joinable()) conn->replier.join();
  std::lock_guard<std::mutex> lk(mu_);
  if (conn->fd >= 0) ::close(conn->fd);
  conn->fd = -1;
  all_out_.erase(std::remove(all_out_.begin(), all_out_.end(), conn), all_out_.end());
}

bool TcpTransport::try_finish_locked(OutConn& conn, const std::shared_ptr<OutBatch>& b) {
  if (b->finished || !b->writing_done) return false;
  if (!b->replied && !b->cancelled && !conn.dead) return false;
  if (b->status == Status::kPending) {
    b->set_outcome(Status::kFailed,
                   "connection to peer " + conn.peer + " lost: " + conn.dead_reason);
  }
  b->finished = true;
  conn.batches.erase(b->batch.ticket);
  return true;
}

void TcpTransport::report(const std::vector<std::shared_ptr<OutBatch>>& finished) {
  for (const auto& b : finished) host_->batch_done(b->batch.ticket, b->status, b->error);
}

void TcpTransport::kill_out(OutConn& conn, const std::string& reason) {
  std::vector<std::shared_ptr<OutBatch>> finished;
  {
    std::lock_guard<std::mutex> lk(conn.mu);
    if (conn.dead) return;
    conn.dead = true;
    conn.dead_reason = reason;
    for (auto& [t, b] : conn.batches) {
      b->set_outcome(Status::kFailed, "connection to peer " + conn.peer + " lost: " + reason);
      b->cancelled = true;
      if (b.get() != conn.writing) b->writing_done = true;
    }
    conn.queue.clear();
    std::vector<std::shared_ptr<OutBatch>> all;
    for (auto& [t, b] : conn.batches) all.push_back(b);
    for (auto& b : all) {
      if (try_finish_locked(conn, b)) finished.push_back(b);
    }
    conn.aborts.clear();
    // cuda_ipc: while a message is in flight the receiver may have granted ranges; the writer
    // reports first and hangs up itself (tcp_ipc.cpp)
    if (!conn.ipc_in_flight) ::shutdown(conn.fd, SHUT_RDWR);
    conn.cv.notify_all();
  }
  report(finished);
}

void TcpTransport::writer_loop(std::shared_ptr<OutConn> conn) {
  // cuda_ipc only; touches no GPU until used
  ipc::Copier copier(&mappings_, next_writer_id_++,
                     reinterpret_cast<ipc::Copier::CopyFn>(config_.device_copy_fn));
  while (true) {
    std::shared_ptr<OutBatch> b;
    std::pair<std::string, std::string> abort_msg;
    bool have_abort = false;
    std::vector<std::shared_ptr<OutBatch>> finished;
    {
      std::unique_lock<std::mutex> lk(conn->mu);
      conn->cv.wait(lk,
                    [&] { return conn->dead || !conn->aborts.empty() || !conn->queue.empty(); });
      if (conn->dead) return;
      if (!conn->aborts.empty()) {
        abort_msg = std::move(conn->aborts.front());
        conn->aborts.pop_front();
        have_abort = true;
      } else {
        b = conn->queue.front();
        if (b->cancelled) {
          conn->queue.pop_front();
          b->writing_done = true;
          if (try_finish_locked(*conn, b)) finished.push_back(b);
          b = nullptr;
        } else {
          conn->writing = b.get();
        }
      }
    }
    report(finished);
    finished.clear();
    if (have_abort) {
      IoResult r = write_control_frame(conn->fd, FrameType::kAbort, 0, abort_msg.first,
                                       abort_msg.second, config_.stall_timeout_s, stop_);
      if (!r.ok) {
        kill_out(*conn, r.error);
        return;
      }
      continue;
    }
    if (!b) continue;

    size_t piece_idx = b->next_piece;
    uint64_t offset = b->next_offset;
    bool last = false;
    IoResult r = ipc_ ? write_ipc_message(*conn, *b, copier, &piece_idx, &offset, &last)
                      : write_tcp_message(*conn, *b, &piece_idx, &offset, &last);
    if (!r.ok) kill_out(*conn, ipc_ ? r.error : "send to peer failed: " + r.error);
    {
      std::lock_guard<std::mutex> lk(conn->mu);
      conn->writing = nullptr;
      b->next_piece = piece_idx;
      b->next_offset = offset;
      if (last || b->cancelled || conn->dead) {
        auto it = std::find(conn->queue.begin(), conn->queue.end(), b);
        if (it != conn->queue.end()) conn->queue.erase(it);
        b->writing_done = true;
        if (try_finish_locked(*conn, b)) finished.push_back(b);
      } else {
        // Fairness across requests: after one message of a long batch, the other requests'
        // batches go first (a whole-request push must not hold up another request's layer).
        // Batches of one request keep their order.
        const std::string& rid = b->batch.request_id;
        std::stable_partition(conn->queue.begin(), conn->queue.end(),
                              [&](const auto& x) { return x->batch.request_id != rid; });
      }
      conn->cv.notify_all();
    }
    report(finished);
    if (!r.ok) return;
  }
}

std::vector<Piece> next_message(const std::vector<Piece>& pieces, size_t* piece_idx,
                                uint64_t* offset, uint64_t max_nbytes) {
  std::vector<Piece> message;
  uint64_t nbytes = 0;
  while (*piece_idx < pieces.size() && message.size() < kMaxPiecesPerMessage &&
         nbytes < max_nbytes) {
    const Piece& p = pieces[*piece_idx];
    uint64_t take = std::min(p.nbytes - *offset, max_nbytes - nbytes);
    message.push_back({p.local_addr + *offset, p.remote_addr + *offset, take});
    nbytes += take;
    *offset += take;
    if (*offset == p.nbytes) {
      ++*piece_idx;
      *offset = 0;
    }
  }
  return message;
}

IoResult TcpTransport::write_tcp_message(OutConn& conn, OutBatch& b, size_t* piece_idx_out,
                                         uint64_t* offset_out, bool* last_out) {
  std::vector<Piece> message =
      next_message(b.batch.pieces, piece_idx_out, offset_out, config_.max_message_nbytes);
  std::vector<WirePiece> table;
  std::vector<iovec> iov(2);
  uint64_t payload = 0;
  for (const Piece& p : message) {
    table.push_back({p.remote_addr, p.nbytes});
    iov.push_back({reinterpret_cast<void*>(p.local_addr), p.nbytes});
    payload += p.nbytes;
  }
  bool last = *piece_idx_out == b.batch.pieces.size();
  FrameHeader header;
  header.type = static_cast<uint8_t>(FrameType::kData);
  header.flags = last ? kFlagLast : 0;
  header.request_id_len = static_cast<uint16_t>(b.batch.request_id.size());
  header.num_pieces = static_cast<uint32_t>(table.size());
  header.ticket = b.batch.ticket;
  header.payload_nbytes = payload;
  std::vector<char> head(sizeof(header) + b.batch.request_id.size());
  std::memcpy(head.data(), &header, sizeof(header));
  std::memcpy(head.data() + sizeof(header), b.batch.request_id.data(), b.batch.request_id.size());
  iov[0] = {head.data(), head.size()};
  iov[1] = {table.data(), table.size() * sizeof(WirePiece)};
  *last_out = last;
  auto guard = host_->local_memory_guard();
  return write_all(conn.fd, iov.data(), static_cast<int>(iov.size()), config_.stall_timeout_s,
                   stop_);
}

void TcpTransport::reply_loop(std::shared_ptr<OutConn> conn) {
  while (true) {
    FrameHeader header;
    std::string rid, text;
    IoResult r =
        read_frame_head(conn->fd, &header, &rid, &text, config_.stall_timeout_s, stop_, true);
    const bool grant = ipc_ && header.type == static_cast<uint8_t>(FrameType::kIpcGrant);
    if (r.ok && grant) r = read_ipc_grant(*conn, header, text);
    if (r.ok && !grant && (header.num_pieces != 0 || header.payload_nbytes != 0)) {
      r = {false, "protocol error: reply frame with payload"};
    }
    if (!r.ok) {
      kill_out(*conn, r.error);
      return;
    }
    auto type = static_cast<FrameType>(header.type);
    if (grant) continue;
    if (type == FrameType::kAbort) {
      host_->remote_abort(rid, text);
      continue;
    }
    if (type != FrameType::kAck && type != FrameType::kNack) {
      kill_out(*conn, "protocol error: unexpected frame type " + std::to_string(header.type));
      return;
    }
    if (ipc_) {  // an answer to the message in flight; its writer settles the batch
      std::lock_guard<std::mutex> lk(conn->mu);
      if (conn->writing != nullptr && conn->writing->batch.ticket == header.ticket) {
        conn->ipc_answered = true;
        conn->ipc_ok = type == FrameType::kAck;
        conn->ipc_error = text;
        conn->cv.notify_all();
      }
      continue;
    }
    std::vector<std::shared_ptr<OutBatch>> finished;
    {
      std::lock_guard<std::mutex> lk(conn->mu);
      auto it = conn->batches.find(header.ticket);
      if (it != conn->batches.end()) {
        auto b = it->second;
        b->replied = true;
        if (type == FrameType::kAck) {
          b->set_outcome(Status::kDone, "");
        } else {
          b->set_outcome(Status::kFailed, "peer " + conn->peer + " refused the data: " + text);
          b->cancelled = true;
          if (b.get() != conn->writing) {
            auto q = std::find(conn->queue.begin(), conn->queue.end(), b);
            if (q != conn->queue.end()) conn->queue.erase(q);
            b->writing_done = true;
          }
        }
        if (try_finish_locked(*conn, b)) finished.push_back(b);
      }
    }
    report(finished);
  }
}

}  // namespace tcp

std::unique_ptr<Transport> make_tcp_transport(const TransportConfig& config) {
  return std::make_unique<tcp::TcpTransport>(config, false);
}

std::unique_ptr<Transport> make_cuda_ipc_transport(const TransportConfig& config) {
  return std::make_unique<tcp::TcpTransport>(config, true);
}

}  // namespace pdserve::transfer
