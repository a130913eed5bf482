// The cuda_ipc backend's two message functions (the rest is the TCP backend's): the sender waits
// for the batch's ready event, names the pieces' GPU allocations and offsets instead of sending
// bytes, and waits until the receiver answered, because until then the receiver reads its memory;
// the receiver admits the pieces, copies them through its mappings of the sender's allocations and
// answers ACK or NACK.
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include "tcp_transport.h"

namespace pdserve::transfer::tcp {

IoResult TcpTransport::write_ipc_message(OutConn& conn, OutBatch& b, size_t* piece_idx,
                                         uint64_t* offset, bool* last) {
  auto fail_locally = [&](const std::string& error) {
    std::lock_guard<std::mutex> lk(conn.mu);
    b.set_outcome(Status::kFailed, error);
    b.cancelled = true;  // nothing was written: the batch ends without a message
    return IoResult{};
  };
  cuda::Driver& driver = cuda::Driver::get();  // loaded by start()
  if (b.ready_event != nullptr) {  // ours (see submit); the wait spins (cuda_driver.cpp says why)
    cuda::Error e = driver.sync_event(b.ready_device, b.ready_event);
    if (!e.ok()) return fail_locally("waiting for the batch's ready event: " + e.text);
    driver.destroy_event(b.ready_device, b.ready_event);
    b.ready_event = nullptr;
  }
  {
    std::lock_guard<std::mutex> lk(conn.mu);
    if (b.cancelled) return {};  // cancelled while its KV was being computed: send nothing
  }
  // max_message_nbytes bounds the copy an abort may have to wait for.
  size_t idx = *piece_idx;
  uint64_t off = *offset;
  std::vector<Piece> slice = next_message(b.batch.pieces, &idx, &off, config_.max_message_nbytes);
  std::vector<WirePiece> table;
  for (const Piece& p : slice) table.push_back({p.remote_addr, p.nbytes});
  // Held until the answer: the receiver reads the local memory until then (so an
  // unregister_memory waits for at most one message's round trip and copy).
  auto guard = host_->local_memory_guard();
  std::vector<ipc::IpcAllocation> allocations;
  std::vector<ipc::IpcSource> sources;
  std::string error = ipc::describe_sources(slice, &allocations, &sources);
  if (!error.empty()) return fail_locally(error);

  *piece_idx = idx;
  *offset = off;
  *last = idx == b.batch.pieces.size();
  FrameHeader header;
  header.type = static_cast<uint8_t>(FrameType::kIpcData);
  header.flags = *last ? kFlagLast : 0;
  header.request_id_len = static_cast<uint16_t>(b.batch.request_id.size());
  header.num_pieces = static_cast<uint32_t>(slice.size());
  header.text_len = static_cast<uint32_t>(allocations.size() * sizeof(ipc::IpcAllocation));
  header.ticket = b.batch.ticket;
  header.payload_nbytes = slice.size() * sizeof(ipc::IpcSource);
  iovec iov[5] = {{&header, sizeof(header)},
                  {const_cast<char*>(b.batch.request_id.data()), b.batch.request_id.size()},
                  {allocations.data(), header.text_len},
                  {table.data(), table.size() * sizeof(WirePiece)},
                  {sources.data(), header.payload_nbytes}};
  {
    std::lock_guard<std::mutex> lk(conn.mu);
    conn.ipc_answered = false;
  }
  IoResult r = write_all(conn.fd, iov, 5, config_.stall_timeout_s, stop_);
  if (!r.ok) return {false, "send to peer failed: " + r.error};

  const auto stall = std::chrono::duration<double>(config_.stall_timeout_s);
  std::unique_lock<std::mutex> lk(conn.mu);
  bool answered =
      conn.cv.wait_for(lk, stall, [&] { return conn.ipc_answered || conn.dead || stop_; });
  if (!answered) {
    // The receiver may still be copying from our memory. Its reader reads the next frame only
    // after the copy returned, so end our side and wait (bounded) for it to hang up: the reply
    // thread sees EOF and marks the connection dead. Only then may the batch end.
    ::shutdown(conn.fd, SHUT_WR);
    conn.cv.wait_for(lk, stall, [&] { return conn.dead || stop_; });
    return {false, "peer " + conn.peer + " answered no copy within " +
                       std::to_string(static_cast<int64_t>(config_.stall_timeout_s)) + " s"};
  }
  if (conn.dead) return {false, conn.dead_reason};
  if (stop_) return {false, "transfer engine closed"};
  if (!conn.ipc_ok) {
    b.replied = true;
    b.set_outcome(Status::kFailed, "peer " + conn.peer + " refused the data: " + conn.ipc_error);
    b.cancelled = true;
  } else if (*last) {
    b.replied = true;
    b.set_outcome(Status::kDone, "");
  }
  return {};
}

IoResult TcpTransport::read_ipc_message(InConn& conn, const FrameHeader& header,
                                        const std::string& request_id, const std::string& text,
                                        ipc::Copier& copier) {
  const size_t count = header.num_pieces;
  if (count == 0 || header.payload_nbytes != count * sizeof(ipc::IpcSource) || text.empty() ||
      text.size() % sizeof(ipc::IpcAllocation) != 0) {
    return {false, "protocol error: IPC_DATA frame with " + std::to_string(count) + " pieces, " +
                       std::to_string(header.payload_nbytes) + " B of sources (want " +
                       std::to_string(count * sizeof(ipc::IpcSource)) + ") and " +
                       std::to_string(text.size()) + " B of allocations (want a multiple of " +
                       std::to_string(sizeof(ipc::IpcAllocation)) + ")"};
  }
  std::vector<WirePiece> table(count);
  std::vector<ipc::IpcSource> sources(count);
  iovec iov[2] = {{table.data(), count * sizeof(WirePiece)},
                  {sources.data(), count * sizeof(ipc::IpcSource)}};
  IoResult r = read_all(conn.fd, iov, 2, config_.stall_timeout_s, stop_, false);
  if (!r.ok) return r;
  std::vector<ipc::IpcAllocation> allocations(text.size() / sizeof(ipc::IpcAllocation));
  std::memcpy(allocations.data(), text.data(), text.size());
  uint64_t nbytes = 0;
  for (size_t i = 0; i < count; ++i) {
    if (table[i].nbytes == 0 || table[i].nbytes > UINT64_MAX - nbytes ||
        sources[i].allocation_idx >= allocations.size()) {
      return {false, "protocol error: IPC_DATA piece " + std::to_string(i) + " has " +
                         std::to_string(table[i].nbytes) + " B and allocation index " +
                         std::to_string(sources[i].allocation_idx) + " of " +
                         std::to_string(allocations.size())};
    }
    nbytes += table[i].nbytes;
  }
  Admission admission = host_->admit(request_id, conn.peer, table.data(), count, nbytes);
  std::string error =
      admission.ok || !admission.error.empty() ? admission.error : "refused by the receiver";
  if (admission.ok) {
    error = copier.copy(allocations, table.data(), sources.data(), count);
    host_->landed(std::move(admission), conn.peer, nbytes, error);
  }
  return reply(conn, error.empty() ? FrameType::kAck : FrameType::kNack, header.ticket, error);
}

}  // namespace pdserve::transfer::tcp
