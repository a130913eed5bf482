// Blocking socket helpers for the TCP backend: listen/connect, exact reads and writes with stall
// detection, and control frames. No connection state lives here.
#include "tcp_wire.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace pdserve::transfer::tcp {
namespace {

using Clock = std::chrono::steady_clock;

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

sockaddr_in resolve(const std::string& host, int port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (host.empty() || host == "0.0.0.0") {
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    return addr;
  }
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1) return addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  int rc = getaddrinfo(host.c_str(), nullptr, &hints, &found);
  if (rc != 0 || found == nullptr) {
    throw TransferError("cannot resolve host '" + host + "': " + gai_strerror(rc));
  }
  addr.sin_addr = reinterpret_cast<sockaddr_in*>(found->ai_addr)->sin_addr;
  freeaddrinfo(found);
  return addr;
}

// Drops the first `moved` bytes from the iovec array; returns the index of the first non-empty one.
int advance(iovec* iov, int iovcnt, int first, size_t moved) {
  while (first < iovcnt && moved > 0) {
    if (moved >= iov[first].iov_len) {
      moved -= iov[first].iov_len;
      iov[first].iov_len = 0;
      ++first;
    } else {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + moved;
      iov[first].iov_len -= moved;
      moved = 0;
    }
  }
  while (first < iovcnt && iov[first].iov_len == 0) ++first;
  return first;
}

constexpr int kIovBatch = 1024;  // IOV_MAX on Linux

}  // namespace

bool same_token(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i]) ^ static_cast<unsigned char>(b[i]);
  }
  return diff == 0;
}

void split_address(const std::string& address, std::string* host, int* port) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    throw std::invalid_argument("peer address '" + address + "' is not of the form host:port");
  }
  *host = address.substr(0, colon);
  try {
    size_t used = 0;
    *port = std::stoi(address.substr(colon + 1), &used);
    if (used != address.size() - colon - 1 || *port <= 0 || *port > 65535) throw 0;
  } catch (...) {
    throw std::invalid_argument("peer address '" + address + "' has no valid port (1..65535)");
  }
}

void configure_socket(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  int idle = 10, interval = 5, count = 3;  // a vanished host is noticed in ~25 s even when idle
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count));
  timeval tick{0, kSocketTickMs * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof(tick));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tick, sizeof(tick));
}

int listen_on(const std::string& host, int port, int* bound_port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw TransferError(errno_text("socket"));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr = resolve(host, port);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    std::string msg = errno_text(("bind " + host + ":" + std::to_string(port)).c_str());
    ::close(fd);
    throw TransferError(msg);
  }
  if (::listen(fd, 128) != 0) {
    std::string msg = errno_text("listen");
    ::close(fd);
    throw TransferError(msg);
  }
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *bound_port = ntohs(addr.sin_port);
  return fd;
}

int connect_to(const std::string& host, int port, double timeout_s) {
  sockaddr_in addr = resolve(host, port);
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) throw TransferError(errno_text("socket"));
  std::string where = host + ":" + std::to_string(port);
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  if (rc != 0 && errno != EINPROGRESS) {
    std::string msg = errno_text(("connect to " + where).c_str());
    ::close(fd);
    throw TransferError(msg);
  }
  if (rc != 0) {
    pollfd p{fd, POLLOUT, 0};
    int ready = ::poll(&p, 1, static_cast<int>(timeout_s * 1000));
    int err = 0;
    socklen_t len = sizeof(err);
    if (ready > 0) getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (ready <= 0 || err != 0) {
      ::close(fd);
      throw TransferError("connect to " + where + ": " +
                          (ready <= 0 ? "timed out after " + std::to_string(timeout_s) + " s"
                                      : std::string(std::strerror(err))));
    }
  }
  int flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  configure_socket(fd);
  return fd;
}

IoResult write_all(int fd, iovec* iov, int iovcnt, double stall_timeout_s,
                   const std::atomic<bool>& stop) {
  int first = advance(iov, iovcnt, 0, 0);
  auto last_progress = Clock::now();
  while (first < iovcnt) {
    msghdr msg{};
    msg.msg_iov = iov + first;
    msg.msg_iovlen = std::min(iovcnt - first, kIovBatch);
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n > 0) {
      first = advance(iov, iovcnt, first, static_cast<size_t>(n));
      last_progress = Clock::now();
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (stop.load()) return {false, "engine closed"};
      if (seconds_since(last_progress) > stall_timeout_s) {
        return {false, "send stalled for " + std::to_string(stall_timeout_s) + " s"};
      }
      continue;
    }
    return {false, errno_text("send")};
  }
  return {};
}

IoResult read_all(int fd, iovec* iov, int iovcnt, double stall_timeout_s,
                  const std::atomic<bool>& stop, bool idle_ok) {
  int first = advance(iov, iovcnt, 0, 0);
  bool any = false;
  auto last_progress = Clock::now();
  while (first < iovcnt) {
    ssize_t n = ::readv(fd, iov + first, std::min(iovcnt - first, kIovBatch));
    if (n > 0) {
      first = advance(iov, iovcnt, first, static_cast<size_t>(n));
      any = true;
      last_progress = Clock::now();
      continue;
    }
    if (n == 0) return {false, "peer closed the connection"};
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (stop.load()) return {false, "engine closed"};
      if ((any || !idle_ok) && seconds_since(last_progress) > stall_timeout_s) {
        return {false, "receive stalled for " + std::to_string(stall_timeout_s) + " s", true};
      }
      continue;
    }
    return {false, errno_text("receive")};
  }
  return {};
}

IoResult read_frame_head(int fd, FrameHeader* header, std::string* request_id, std::string* text,
                         double stall_timeout_s, const std::atomic<bool>& stop, bool idle_ok) {
  iovec iov{header, sizeof(FrameHeader)};
  IoResult r = read_all(fd, &iov, 1, stall_timeout_s, stop, idle_ok);
  if (!r.ok) return r;
  if (header->magic != kMagic) return {false, "protocol error: bad frame magic"};
  if (header->request_id_len > kMaxRequestIdLen || header->text_len > kMaxTextLen ||
      header->num_pieces > kMaxPiecesPerMessage) {
    return {false, "protocol error: frame exceeds limits (request id " +
                       std::to_string(header->request_id_len) + " B, text " +
                       std::to_string(header->text_len) + " B, pieces " +
                       std::to_string(header->num_pieces) + ")"};
  }
  request_id->resize(header->request_id_len);
  text->resize(header->text_len);
  iovec parts[2] = {{request_id->data(), request_id->size()}, {text->data(), text->size()}};
  return read_all(fd, parts, 2, stall_timeout_s, stop, false);
}

IoResult write_control_frame(int fd, FrameType type, uint64_t ticket, const std::string& request_id,
                             const std::string& text, double stall_timeout_s,
                             const std::atomic<bool>& stop) {
  FrameHeader header;
  header.type = static_cast<uint8_t>(type);
  header.request_id_len =
      static_cast<uint16_t>(std::min<size_t>(request_id.size(), kMaxRequestIdLen));
  header.text_len = static_cast<uint32_t>(std::min<size_t>(text.size(), kMaxTextLen));
  header.ticket = ticket;
  iovec iov[3] = {{&header, sizeof(header)},
                  {const_cast<char*>(request_id.data()), header.request_id_len},
                  {const_cast<char*>(text.data()), header.text_len}};
  return write_all(fd, iov, 3, stall_timeout_s, stop);
}

}  // namespace pdserve::transfer::tcp
