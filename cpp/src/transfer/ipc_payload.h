// The CUDA-IPC backend's payload: instead of the bytes, a DATA message carries where they are in
// the sender's GPU memory (an exported allocation handle and an offset per piece), and the
// receiver's reader thread copies them itself through the mapped allocation, then acknowledges the
// message. The connection, framing, admission and abort logic are the TCP backend's
// (tcp_transport.h).
//
// Wire (frame type kIpcData): pieces = destination ranges (WirePiece, as for TCP); text = the
// allocations the message reads from (IpcAllocation each); payload = one IpcSource per piece.
#pragma once

#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "cuda_driver.h"
#include "pdserve/transfer/transport.h"

namespace pdserve::transfer::ipc {

#pragma pack(push, 1)
// One of the sender's GPU allocations, as exported for other processes.
struct IpcAllocation {
  cuda::IpcHandle handle;
  uint64_t base = 0;           // its address in the sender (used as is when the receiver is the
                               // sender's own process, where a handle cannot be opened)
  uint64_t process_token = 0;  // names the sender's process (see process_token())
};
// Where one piece's bytes start in the sender's memory.
struct IpcSource {
  uint32_t allocation_idx = 0;  // index into the message's IpcAllocation table
  uint32_t reserved = 0;
  uint64_t offset = 0;  // from the allocation's base
};
#pragma pack(pop)
static_assert(sizeof(IpcAllocation) == 80, "wire allocation entry must stay 80 bytes");
static_assert(sizeof(IpcSource) == 16, "wire source entry must stay 16 bytes");
// Every message's allocation table fits in a frame's text (at most one allocation per piece).
static_assert(512 * sizeof(IpcAllocation) <= 64 * 1024,
              "kMaxPiecesPerMessage allocations > kMaxTextLen");

// A random number fixed for this process's lifetime.
uint64_t process_token();

// Sender: the allocation table and sources of `pieces` (their local_addr). Returns an error text
// (empty on success) when a local range is not exportable GPU memory.
std::string describe_sources(const std::vector<Piece>& pieces,
                             std::vector<IpcAllocation>* allocations,
                             std::vector<IpcSource>* sources);

// Receiver: the sender allocations this process has mapped, shared by every reader thread and
// counted per reader so that a mapping lives while any reader that opened it does.
class Mappings {
 public:
  // The local address of allocation on device (opening it on first use by `reader`) and its size.
  std::string acquire(uint64_t reader, int device, const IpcAllocation& allocation,
                      cuda::CUdeviceptr* ptr, uint64_t* nbytes);
  // Drops every mapping `reader` acquired; closes those no reader holds any more.
  void release_reader(uint64_t reader);

 private:
  struct Entry {
    int device;
    cuda::CUdeviceptr ptr;
    uint64_t nbytes;
    std::set<uint64_t> readers;
  };
  std::mutex mu_;
  std::map<std::string, Entry> entries_;  // key: device + handle bytes
};

// Receiver, per reader thread: one copy stream per destination device.
class Copier {
 public:
  using CopyFn = int (*)(const uint64_t*, const uint64_t*, const uint64_t*, size_t, void*);
  // copy_fn: TransportConfig::device_copy_fn (null: the driver's copies).
  Copier(Mappings* mappings, uint64_t reader_id, CopyFn copy_fn)
      : mappings_(mappings), reader_id_(reader_id), copy_fn_(copy_fn) {}
  ~Copier();  // destroys the streams and releases the reader's mappings
  Copier(const Copier&) = delete;
  Copier& operator=(const Copier&) = delete;

  // Copies every piece from the sender's memory into its destination and waits for the copies.
  // Returns an error text (empty on success); on error some bytes may have landed.
  std::string copy(const std::vector<IpcAllocation>& allocations, const WirePiece* pieces,
                   const IpcSource* sources, size_t num_pieces);

 private:
  Mappings* mappings_;
  uint64_t reader_id_;
  CopyFn copy_fn_;
  std::map<int, cuda::CUstream> streams_;
  bool used_driver_ = false;
};

}  // namespace pdserve::transfer::ipc
