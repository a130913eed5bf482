// The cuda_ipc backend's two message functions (the rest is the TCP backend's): the sender waits
// for the batch's ready event, names the pieces' GPU allocations and offsets instead of sending
// bytes, and waits until the receiver answered, because until then the receiver reads its memory;
// the receiver admits the pieces, copies them through its mappings of the sender's allocations and
// answers ACK or NACK.
#include <algorithm>
#include <cstring>

#include "tcp_transport.h"

namespace pdserve::transfer::tcp {

IoResult TcpTransport::write_ipc_message(OutConn& conn, OutBatch& b, size_t* piece_idx,
                                         bool* last) {
  auto fail_locally = [&](const std::string& error) {
    std::lock_guard<std::mutex> lk(conn.mu);
    b.set_outcome(Status::kFailed, error);
    b.cancelled = true;  // nothing was written: the batch ends without a message
    return IoResult{};
  };
  const std::vector<Piece>& pieces = b.batch.pieces;
  const size_t first = *piece_idx;
  cuda::Driver& driver = cuda::Driver::get();  // loaded by start()
  if (!b.ready_waited) {
    if (b.batch.options.ready_event != 0) {
      int device = 0;
      cuda::Error e = driver.device_of(pieces[first].local_addr, &device);
      if (e.ok()) {
        e = driver.sync_event(device, reinterpret_cast<cuda::CUevent>(b.batch.options.ready_event));
      }
      if (!e.ok()) return fail_locally("waiting for the batch's ready event: " + e.text);
    }
    b.ready_waited = true;
  }
  const size_t count = std::min<size_t>(pieces.size() - first, kMaxPiecesPerMessage);
  std::vector<WirePiece> table;
  for (size_t i = first; i < first + count; ++i) {
    table.push_back({pieces[i].remote_addr, pieces[i].nbytes});
  }
  // Held until the answer: the receiver reads the local memory until then.
  auto guard = host_->local_memory_guard();
  std::vector<ipc::IpcAllocation> allocations;
  std::vector<ipc::IpcSource> sources;
  std::string error = ipc::describe_sources(pieces, first, count, &allocations, &sources);
  if (!error.empty()) return fail_locally(error);

  *piece_idx = first + count;
  *last = *piece_idx == pieces.size();
  FrameHeader header;
  header.type = static_cast<uint8_t>(FrameType::kIpcData);
  header.flags = *last ? kFlagLast : 0;
  header.request_id_len = static_cast<uint16_t>(b.batch.request_id.size());
  header.num_pieces = static_cast<uint32_t>(count);
  header.text_len = static_cast<uint32_t>(allocations.size() * sizeof(ipc::IpcAllocation));
  header.ticket = b.batch.ticket;
  header.payload_nbytes = count * sizeof(ipc::IpcSource);
  iovec iov[5] = {{&header, sizeof(header)},
                  {const_cast<char*>(b.batch.request_id.data()), b.batch.request_id.size()},
                  {allocations.data(), header.text_len},
                  {table.data(), count * sizeof(WirePiece)},
                  {sources.data(), header.payload_nbytes}};
  {
    std::lock_guard<std::mutex> lk(conn.mu);
    conn.ipc_answered = false;
  }
  IoResult r = write_all(conn.fd, iov, 5, config_.stall_timeout_s, stop_);
  if (!r.ok) return r;

  std::unique_lock<std::mutex> lk(conn.mu);
  bool answered = conn.cv.wait_for(lk, std::chrono::duration<double>(config_.stall_timeout_s),
                                   [&] { return conn.ipc_answered || conn.dead || stop_; });
  if (conn.dead) return {false, conn.dead_reason};
  if (stop_) return {false, "transfer engine closed"};
  if (!answered) {
    return {false, "the peer did not answer a copy within " +
                       std::to_string(config_.stall_timeout_s) + " s"};
  }
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
    return {false, "protocol error: malformed IPC_DATA frame"};
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
      return {false, "protocol error: bad piece in IPC_DATA frame"};
    }
    nbytes += table[i].nbytes;
  }
  Admission admission = host_->admit(request_id, conn.peer, table.data(), count, nbytes);
  std::string error = admission.ok || !admission.error.empty() ? admission.error : "refused";
  if (admission.ok) {
    error = copier.copy(allocations, table.data(), sources.data(), count);
    host_->landed(std::move(admission), conn.peer, nbytes, error);
  }
  return reply(conn, error.empty() ? FrameType::kAck : FrameType::kNack, header.ticket, error);
}

}  // namespace pdserve::transfer::tcp
