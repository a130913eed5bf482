// The cuda_ipc backend's message exchange (the rest is the TCP backend's). Per message:
//   sender                                   receiver
//   waits for the batch's ready event
//   IPC_WRITE (destination ranges)  ------>  admits them (the request's blocks stay put until
//                                            landed), exports their allocations
//                                   <------  IPC_GRANT (allocations, locations) or NACK
//   maps the allocations, copies on its
//   own stream, waits for the copy
//   IPC_WRITTEN (error or none)     ------>  landed()
//                                   <------  ACK or NACK
// The receiver may release the ranges only once the sender's copy is over. So from IPC_WRITE on, a
// live sender always reports (IPC_WRITTEN "nothing copied: ..." when it gave up before copying),
// even while its connection is being torn down, and only then hangs up; a receiver whose sender
// hung up mid-message without a report waits (bounded) for that process to end, and one whose
// sender is silent but connected keeps the ranges.
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "tcp_transport.h"

namespace pdserve::transfer::tcp {

namespace {

// Waits (under conn.mu, held by lk) for the answer to the message in flight, the connection's
// death or the engine's stop. Returns whether any came within timeout_s.
bool wait_answer(OutConn& conn, std::unique_lock<std::mutex>& lk, double timeout_s,
                 const std::atomic<bool>& stop) {
  return conn.cv.wait_for(lk, std::chrono::duration<double>(timeout_s),
                          [&] { return conn.ipc_answered || conn.dead || stop; });
}

std::string seconds_text(double s) { return std::to_string(static_cast<int64_t>(s)) + " s"; }

}  // namespace

IoResult TcpTransport::write_ipc_message(OutConn& conn, OutBatch& b, ipc::Copier& copier,
                                         size_t* piece_idx, uint64_t* offset, bool* last) {
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
  // Held until the copy ended: it reads the local memory (so an unregister_memory waits for at most
  // one message's round trips and copy).
  auto guard = host_->local_memory_guard();
  std::vector<int> devices;
  std::string error = copier.locate(slice, &devices);
  if (!error.empty()) return fail_locally(error);
  std::vector<WirePiece> table;
  for (const Piece& p : slice) table.push_back({p.remote_addr, p.nbytes});
  *piece_idx = idx;
  *offset = off;
  *last = idx == b.batch.pieces.size();

  // 1. Ask for the destinations. From here until the report is written the receiver may hold
  //    granted ranges, so only this thread may hang up (kill_out leaves it to us).
  const ipc::IpcWriter me = ipc::this_writer();
  FrameHeader header;
  header.type = static_cast<uint8_t>(FrameType::kIpcWrite);
  header.flags = *last ? kFlagLast : 0;
  header.request_id_len = static_cast<uint16_t>(b.batch.request_id.size());
  header.num_pieces = static_cast<uint32_t>(table.size());
  header.text_len = sizeof(me);
  header.ticket = b.batch.ticket;
  iovec iov[4] = {{&header, sizeof(header)},
                  {const_cast<char*>(b.batch.request_id.data()), b.batch.request_id.size()},
                  {const_cast<ipc::IpcWriter*>(&me), sizeof(me)},
                  {table.data(), table.size() * sizeof(WirePiece)}};
  {
    std::lock_guard<std::mutex> lk(conn.mu);
    if (conn.dead) return {false, conn.dead_reason};
    conn.ipc_answered = false;
    conn.ipc_in_flight = true;
  }
  // Ends the message: reports `report` to the receiver unless it refused the request (best effort,
  // even when the connection is being torn down), then hangs up if the connection died meanwhile.
  auto end_message = [&](bool report_owed, const std::string& report, IoResult result) {
    if (report_owed) {
      const std::atomic<bool> never{false};
      bool quick = false;
      {
        std::lock_guard<std::mutex> lk(conn.mu);
        quick = conn.dead || stop_;
      }
      IoResult w = write_control_frame(conn.fd, FrameType::kIpcWritten, b.batch.ticket, "", report,
                                       quick ? 1.0 : config_.stall_timeout_s, never);
      if (!w.ok && result.ok) result = {false, "send to peer failed: " + w.error};
    }
    std::lock_guard<std::mutex> lk(conn.mu);
    conn.ipc_in_flight = false;
    if (conn.dead) {
      ::shutdown(conn.fd, SHUT_RDWR);  // kill_out left it to us
      if (result.ok) result = {false, conn.dead_reason};
    }
    return result;
  };
  IoResult r = write_all(conn.fd, iov, 4, config_.stall_timeout_s, stop_);
  // A request that did not arrive whole was granted nothing: no report owed.
  if (!r.ok) return end_message(false, "", {false, "send to peer failed: " + r.error});
  std::vector<ipc::IpcAllocation> allocations;
  std::vector<ipc::IpcLocation> locations;
  {
    std::unique_lock<std::mutex> lk(conn.mu);
    bool answered = wait_answer(conn, lk, config_.stall_timeout_s, stop_) && conn.ipc_answered;
    if (!answered) {  // a grant may be on its way: tell the receiver nothing was copied
      std::string why = conn.dead ? conn.dead_reason
                        : stop_   ? std::string("transfer engine closed")
                                  : "peer " + conn.peer + " answered no write request within " +
                                        seconds_text(config_.stall_timeout_s);
      lk.unlock();
      return end_message(true, "nothing copied: " + why, {false, why});
    }
    if (!conn.ipc_ok) {  // refused: nothing granted, no report owed
      b.replied = true;
      b.set_outcome(Status::kFailed, "peer " + conn.peer + " refused the data: " + conn.ipc_error);
      b.cancelled = true;
      lk.unlock();
      return end_message(false, "", {});
    }
    allocations = std::move(conn.ipc_allocations);
    locations = std::move(conn.ipc_locations);
    conn.ipc_answered = false;
  }

  // 2. Copy (waits for the copy to end).
  error = locations.size() == slice.size()
              ? copier.copy(slice, devices, allocations, locations.data())
              : "protocol error: " + std::to_string(locations.size()) + " locations granted for " +
                    std::to_string(slice.size()) + " pieces";

  // 3. Report the copy's end and wait for the answer.
  r = end_message(true, error, {});
  if (!r.ok) return r;
  std::unique_lock<std::mutex> lk(conn.mu);
  if (!wait_answer(conn, lk, config_.stall_timeout_s, stop_)) {
    return {false, "peer " + conn.peer + " answered no copy report within " +
                       seconds_text(config_.stall_timeout_s)};
  }
  if (conn.dead) return {false, conn.dead_reason};
  if (stop_) return {false, "transfer engine closed"};
  if (!error.empty()) {
    b.replied = true;
    b.set_outcome(Status::kFailed, "copy into peer " + conn.peer + " failed: " + error);
    b.cancelled = true;
  } else if (!conn.ipc_ok) {
    b.replied = true;
    b.set_outcome(Status::kFailed, "peer " + conn.peer + " refused the data: " + conn.ipc_error);
    b.cancelled = true;
  } else if (*last) {
    b.replied = true;
    b.set_outcome(Status::kDone, "");
  }
  return {};
}

IoResult TcpTransport::read_ipc_grant(OutConn& conn, const FrameHeader& header,
                                      const std::string& text) {
  const uint64_t count = header.payload_nbytes / sizeof(ipc::IpcLocation);
  if (header.num_pieces != 0 || header.payload_nbytes % sizeof(ipc::IpcLocation) != 0 ||
      count == 0 || count > kMaxPiecesPerMessage || text.empty() ||
      text.size() % sizeof(ipc::IpcAllocation) != 0) {
    return {false, "protocol error: IPC_GRANT frame with " + std::to_string(header.payload_nbytes) +
                       " B of locations and " + std::to_string(text.size()) + " B of allocations"};
  }
  std::vector<ipc::IpcLocation> locations(count);
  iovec iov{locations.data(), count * sizeof(ipc::IpcLocation)};
  IoResult r = read_all(conn.fd, &iov, 1, config_.stall_timeout_s, stop_, false);
  if (!r.ok) return r;
  std::vector<ipc::IpcAllocation> allocations(text.size() / sizeof(ipc::IpcAllocation));
  std::memcpy(allocations.data(), text.data(), text.size());
  std::lock_guard<std::mutex> lk(conn.mu);
  if (conn.writing != nullptr && conn.writing->batch.ticket == header.ticket) {
    conn.ipc_allocations = std::move(allocations);
    conn.ipc_locations = std::move(locations);
    conn.ipc_answered = true;
    conn.ipc_ok = true;
    conn.cv.notify_all();
  }
  return {};
}

IoResult TcpTransport::read_ipc_write(InConn& conn, const FrameHeader& header,
                                      const std::string& request_id, const std::string& text) {
  const size_t count = header.num_pieces;
  ipc::IpcWriter writer;
  if (count == 0 || header.payload_nbytes != 0 || text.size() != sizeof(writer)) {
    return {false, "protocol error: IPC_WRITE frame with " + std::to_string(count) + " pieces, " +
                       std::to_string(header.payload_nbytes) + " B of payload and " +
                       std::to_string(text.size()) + " B of text"};
  }
  std::memcpy(&writer, text.data(), sizeof(writer));
  std::vector<WirePiece> table(count);
  iovec iov{table.data(), count * sizeof(WirePiece)};
  IoResult r = read_all(conn.fd, &iov, 1, config_.stall_timeout_s, stop_, false);
  if (!r.ok) return r;
  uint64_t nbytes = 0;
  for (size_t i = 0; i < count; ++i) {
    if (table[i].nbytes == 0 || table[i].nbytes > UINT64_MAX - nbytes) {
      return {false, "protocol error: IPC_WRITE piece " + std::to_string(i) + " has " +
                         std::to_string(table[i].nbytes) + " B"};
    }
    nbytes += table[i].nbytes;
  }
  Admission admission = host_->admit(request_id, conn.peer, table.data(), count, nbytes);
  if (!admission.ok) {
    return reply(conn, FrameType::kNack, header.ticket,
                 admission.error.empty() ? "refused by the receiver" : admission.error);
  }
  std::vector<ipc::IpcAllocation> allocations;
  std::vector<ipc::IpcLocation> locations;
  std::string error = ipc::describe_destinations(table.data(), count, &allocations, &locations);
  if (!error.empty()) {
    host_->landed(std::move(admission), conn.peer, nbytes, error);
    return reply(conn, FrameType::kNack, header.ticket, error);
  }
  FrameHeader grant;
  grant.type = static_cast<uint8_t>(FrameType::kIpcGrant);
  grant.text_len = static_cast<uint32_t>(allocations.size() * sizeof(ipc::IpcAllocation));
  grant.ticket = header.ticket;
  grant.payload_nbytes = locations.size() * sizeof(ipc::IpcLocation);
  iovec giov[3] = {{&grant, sizeof(grant)},
                   {allocations.data(), grant.text_len},
                   {locations.data(), grant.payload_nbytes}};
  {
    std::lock_guard<std::mutex> wlk(conn.write_mu);
    if (conn.closing) {
      r = {false, "transfer engine closed"};
    } else {
      r = write_all(conn.fd, giov, 3, config_.stall_timeout_s, stop_);
      conn.ipc_granted = r.ok;  // shutdown() leaves this connection to us until the report
    }
  }
  if (!r.ok) {  // the sender never holds a whole grant without every byte written: it copies
                // nothing
    host_->landed(std::move(admission), conn.peer, nbytes, "granting the write failed: " + r.error);
    return r;
  }
  // The sender is copying into the ranges now: wait for its report (the copy is short, bounded by
  // max_message_nbytes), even when this engine is closing. The ranges are released only once no
  // copy can run: on the report, or once the sender's process ended.
  const std::atomic<bool> never{false};
  FrameHeader done;
  std::string rid, report;
  bool closing_seen = false;
  while (true) {
    r = read_frame_head(conn.fd, &done, &rid, &report, config_.stall_timeout_s, never, false);
    if (r.ok || !r.stalled) break;
    // Silent but connected: its copy may still run (a hung GPU), so keep the ranges. When this
    // engine closes, give it one more stall timeout, then hang up and treat it as gone below.
    std::lock_guard<std::mutex> wlk(conn.write_mu);
    if (conn.closing && closing_seen) {
      ::shutdown(conn.fd, SHUT_RDWR);
      break;
    }
    closing_seen = conn.closing;
  }
  if (r.ok && (done.type != static_cast<uint8_t>(FrameType::kIpcWritten) ||
               done.ticket != header.ticket || done.num_pieces != 0 || done.payload_nbytes != 0)) {
    r = {false, "protocol error: expected IPC_WRITTEN for ticket " + std::to_string(header.ticket) +
                    ", got frame type " + std::to_string(done.type) + " for ticket " +
                    std::to_string(done.ticket)};
  }
  bool closing = false;
  {
    std::lock_guard<std::mutex> wlk(conn.write_mu);
    conn.ipc_granted = false;
    closing = conn.closing;
  }
  if (!r.ok) {
    std::string state = ipc::wait_writer_gone(writer, config_.stall_timeout_s);
    host_->landed(std::move(admission), conn.peer, nbytes,
                  "no copy report from " + conn.peer + " (" + r.error + "); " + state);
    return r;
  }
  host_->landed(std::move(admission), conn.peer, nbytes, report);
  if (closing) return {false, "transfer engine closed"};  // the reader hangs up
  return reply(conn, report.empty() ? FrameType::kAck : FrameType::kNack, header.ticket, report);
}

}  // namespace pdserve::transfer::tcp
