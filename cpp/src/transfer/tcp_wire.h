// The TCP backend's wire format and blocking socket helpers. Kept apart from the connection logic
// so the framing can be read (and unit-tested) in one place.
//
// Every frame is a 32-byte FrameHeader, then request_id_len bytes of request id, text_len bytes of
// text, num_pieces WirePieces (16 bytes each) and payload_nbytes bytes of payload, in that order.
//   HELLO      connector -> acceptor: request id = the connector's cluster token (empty: none),
//              text = the connector's own listening address
//   HELLO_ACK  acceptor -> connector: text = the acceptor's address
//   NACK       acceptor -> connector, instead of HELLO_ACK: the acceptor refuses the connection
//              (text = why; starts with kTokenMismatch when the cluster tokens differ) and hangs up
//   DATA       connector -> acceptor: request id, ticket, pieces (destination ranges), payload =
//              the pieces' bytes back to back; flag LAST on the final message of a batch
//   ACK / NACK acceptor -> connector: ticket (+ text = why, for NACK); one per batch (tcp); for
//              cuda_ipc a NACK refuses an IPC_WRITE, and ACK or NACK answers each IPC_WRITTEN
//   ABORT      either way: request id, text = reason
// cuda_ipc only, instead of DATA (ipc_payload.h; three frames per message, one message in flight):
//   IPC_WRITE    connector -> acceptor: as DATA without payload (pieces = destination ranges, flag
//                LAST), text = the sender's process id (8 bytes)
//   IPC_GRANT    acceptor -> connector: ticket, text = the acceptor's exported allocations,
//                payload = one location per piece; or NACK when refused
//   IPC_WRITTEN  connector -> acceptor: ticket, text = why the copy failed (empty: every byte
//                landed), sent once the sender's copy ended; answered with ACK or NACK
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "pdserve/transfer/transport.h"

namespace pdserve::transfer::tcp {

constexpr uint32_t kMagic = 0x46544450;  // "PDTF" little-endian; a mismatch means a foreign peer
enum class FrameType : uint8_t {
  kHello = 1,
  kHelloAck = 2,
  kData = 3,
  kAck = 4,
  kNack = 5,
  kAbort = 6,
  kIpcWrite = 7,   // cuda_ipc: may these destination ranges be written?
  kIpcGrant = 8,   // cuda_ipc: yes, here is where they lie
  kIpcWritten = 9  // cuda_ipc: the copy ended
};
constexpr uint8_t kFlagLast = 1;

constexpr uint32_t kMaxRequestIdLen = 1024;  // also bounds the cluster token (HELLO's request id)
constexpr uint32_t kMaxTextLen = 64 * 1024;
constexpr uint32_t kMaxPiecesPerMessage = 512;  // one readv/sendmsg covers a message (IOV_MAX 1024)

#pragma pack(push, 1)
struct FrameHeader {
  uint32_t magic = kMagic;
  uint8_t type = 0;
  uint8_t flags = 0;
  uint16_t request_id_len = 0;
  uint32_t num_pieces = 0;
  uint32_t text_len = 0;
  uint64_t ticket = 0;
  uint64_t payload_nbytes = 0;
};
#pragma pack(pop)
static_assert(sizeof(FrameHeader) == 32, "wire header must stay 32 bytes");
static_assert(sizeof(WirePiece) == 16, "wire piece must stay 16 bytes");

// How a NACK answering HELLO begins when the acceptor's cluster token is not the connector's.
constexpr char kTokenMismatch[] = "cluster token mismatch";

// Whether a and b hold the same bytes, in a time that depends on their lengths only (an early exit
// at the first differing byte would let a prober guess a token byte by byte).
bool same_token(const std::string& a, const std::string& b);

// Outcome of a blocking socket operation.
struct IoResult {
  bool ok = true;
  std::string error;     // "peer closed the connection", "stalled for 30 s", strerror(...)
  bool stalled = false;  // nothing moved for the stall timeout; the connection may still be alive
};

// Sockets carry a short SO_RCVTIMEO / SO_SNDTIMEO tick so blocking loops notice `stop` and stalls.
constexpr int kSocketTickMs = 100;

// Listens on host:port (port 0: any). Returns the fd and stores the bound port; throws
// TransferError.
int listen_on(const std::string& host, int port, int* bound_port);
// Connects to host:port within timeout_s; throws TransferError with the reason.
int connect_to(const std::string& host, int port, double timeout_s);
// TCP_NODELAY, keepalive, the timeout tick, large buffers.
void configure_socket(int fd);
// Splits "host:port"; throws std::invalid_argument when malformed.
void split_address(const std::string& address, std::string* host, int* port);

// Writes every byte of iov[0..iovcnt) (modifies iov). Fails when no byte moves for stall_timeout_s
// or when stop becomes true.
IoResult write_all(int fd, iovec* iov, int iovcnt, double stall_timeout_s,
                   const std::atomic<bool>& stop);
// Reads exactly the iov bytes (modifies iov). With idle_ok, waiting before the first byte never
// counts as a stall (an idle connection between frames).
IoResult read_all(int fd, iovec* iov, int iovcnt, double stall_timeout_s,
                  const std::atomic<bool>& stop, bool idle_ok);

// Reads one frame's header, request id and text (not its pieces or payload) and checks the limits.
IoResult read_frame_head(int fd, FrameHeader* header, std::string* request_id, std::string* text,
                         double stall_timeout_s, const std::atomic<bool>& stop, bool idle_ok);
// Writes a frame with no pieces and no payload (HELLO, ACK, NACK, ABORT).
IoResult write_control_frame(int fd, FrameType type, uint64_t ticket, const std::string& request_id,
                             const std::string& text, double stall_timeout_s,
                             const std::atomic<bool>& stop);

}  // namespace pdserve::transfer::tcp
