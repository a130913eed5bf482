// The TCP backend, receiver side: the listener thread and one reader thread per inbound connection,
// which checks each message with the engine, then readv()s the payload straight into registered
// memory (or drains it when refused) and acknowledges whole batches. With cuda_ipc the reader
// grants each message's ranges and waits for the sender's copy report instead (tcp_ipc.cpp).
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <unordered_set>

#include "tcp_transport.h"

namespace pdserve::transfer::tcp {

void TcpTransport::accept_loop() {
  while (!stop_) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (stop_) return;
      if (errno == EINTR || errno == ECONNABORTED) continue;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    configure_socket(fd);
    auto conn = std::make_shared<InConn>();
    conn->fd = fd;
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) {
      ::close(fd);
      return;
    }
    reap_dead_in_locked();
    all_in_.push_back(conn);
    conn->reader = std::thread([this, conn] { reader_loop(conn); });
  }
}

void TcpTransport::reap_dead_in_locked() {
  for (auto it = all_in_.begin(); it != all_in_.end();) {
    if ((*it)->exited && (*it)->reader.joinable()) {
      (*it)->reader.join();
      ::close((*it)->fd);
      it = all_in_.erase(it);
    } else {
      ++it;
    }
  }
}

IoResult TcpTransport::reply(InConn& conn, FrameType type, uint64_t ticket,
                             const std::string& text) {
  std::lock_guard<std::mutex> wlk(conn.write_mu);
  return write_control_frame(conn.fd, type, ticket, "", text, config_.stall_timeout_s, stop_);
}

IoResult TcpTransport::handshake(InConn& conn) {
  FrameHeader header;
  std::string token, text;
  IoResult r =
      read_frame_head(conn.fd, &header, &token, &text, config_.stall_timeout_s, stop_, false);
  if (!r.ok) return r;
  if (header.type != static_cast<uint8_t>(FrameType::kHello)) {
    return {false, "protocol error: expected HELLO"};
  }
  // Once per connection, never per frame: an accepted connection is trusted from here on.
  if (!config_.cluster_token.empty() && !same_token(token, config_.cluster_token)) {
    // Neither token is echoed: the refusal only says which side lacks what.
    std::string why = std::string(kTokenMismatch) + ": the receiver at " + address_ +
                      " requires the cluster token and the HELLO carried " +
                      (token.empty() ? "none" : "a different one");
    reply(conn, FrameType::kNack, 0, why);  // best effort: the caller hangs up either way
    return {false, why};
  }
  conn.peer = text;
  return reply(conn, FrameType::kHelloAck, 0, address_);
}

void TcpTransport::reader_loop(std::shared_ptr<InConn> conn) {
  IoResult r = handshake(*conn);
  if (!r.ok) {
    conn->dead = true;
    ::shutdown(conn->fd, SHUT_RDWR);
    conn->exited = true;
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    in_.push_back(conn);
  }
  FrameHeader header;
  std::string rid, text;
  std::unordered_set<Ticket> refused;  // batches NACKed already; their later messages are dropped
  std::vector<WirePiece> table;
  std::vector<iovec> iov;
  std::vector<char> scratch(256 * 1024);
  std::string reason;
  while (true) {
    r = read_frame_head(conn->fd, &header, &rid, &text, config_.stall_timeout_s, stop_, true);
    if (!r.ok) {
      reason = r.error;
      break;
    }
    auto type = static_cast<FrameType>(header.type);
    if (type == FrameType::kAbort) {
      host_->remote_abort(rid, text);
      continue;
    }
    if (type == FrameType::kIpcWritten && ipc_ && header.num_pieces == 0 &&
        header.payload_nbytes == 0) {
      continue;  // the report of a write this side refused (the sender reports when in doubt)
    }
    if (type == FrameType::kIpcWrite && ipc_) {
      r = read_ipc_write(*conn, header, rid, text);
      if (!r.ok) {
        reason = r.error;
        break;
      }
      continue;
    }
    if (type != FrameType::kData || ipc_) {
      reason = "protocol error: unexpected frame type " + std::to_string(header.type);
      break;
    }
    table.resize(header.num_pieces);
    iovec tiov{table.data(), table.size() * sizeof(WirePiece)};
    r = read_all(conn->fd, &tiov, 1, config_.stall_timeout_s, stop_, false);
    if (!r.ok) {
      reason = r.error;
      break;
    }
    uint64_t sum = 0;
    bool sane = true;
    for (const auto& p : table) {
      if (p.nbytes > header.payload_nbytes - sum) sane = false;
      if (!sane) break;
      sum += p.nbytes;
    }
    if (!sane || sum != header.payload_nbytes) {
      reason = "protocol error: piece sizes do not add up to the payload";
      break;
    }
    Admission admission =
        host_->admit(rid, conn->peer, table.data(), table.size(), header.payload_nbytes);
    if (admission.ok) {
      iov.clear();
      for (const auto& p : table) {
        iov.push_back({reinterpret_cast<void*>(p.remote_addr), p.nbytes});
      }
      r = read_all(conn->fd, iov.data(), static_cast<int>(iov.size()), config_.stall_timeout_s,
                   stop_, false);
      host_->landed(
          std::move(admission), conn->peer, header.payload_nbytes,
          r.ok ? "" : "connection from " + conn->peer + " broke in the middle of a message");
    } else {
      uint64_t left = header.payload_nbytes;
      while (r.ok && left > 0) {
        iovec siov{scratch.data(), std::min<uint64_t>(left, scratch.size())};
        left -= siov.iov_len;
        r = read_all(conn->fd, &siov, 1, config_.stall_timeout_s, stop_, false);
      }
      if (r.ok && refused.insert(header.ticket).second) {
        r = reply(*conn, FrameType::kNack, header.ticket, admission.error);
        if (refused.size() > 100000) refused.clear();  // bound: senders stop after a NACK
      }
    }
    if (r.ok && (header.flags & kFlagLast)) {
      if (refused.erase(header.ticket) == 0) r = reply(*conn, FrameType::kAck, header.ticket, "");
    }
    if (!r.ok) {
      reason = r.error;
      break;
    }
  }
  conn->dead = true;
  // Hang up now so the sender's batches fail at once; the fd is closed when the reader is reaped.
  ::shutdown(conn->fd, SHUT_RDWR);
  {
    std::lock_guard<std::mutex> lk(mu_);
    in_.erase(std::remove(in_.begin(), in_.end(), conn), in_.end());
  }
  host_->inbound_lost(conn->peer, reason);
  conn->exited = true;  // last: the acceptor joins it under mu_, which this thread took above
}

}  // namespace pdserve::transfer::tcp
