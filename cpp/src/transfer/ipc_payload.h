// The CUDA-IPC payload. The bytes never cross the socket: the receiver admits a message's
// destination ranges and answers with where they lie in its GPU memory (an exported allocation
// handle and an offset per piece); the sender maps those allocations and copies its pieces into
// them on its own GPU stream, then reports the message written. The sender copies (not the
// receiver) so that, with a prefill and a decode process sharing a GPU, the copy runs in the
// prefill's CUDA context beside its compute instead of forcing a context switch per message
// (bench/experiments/timeslice_latency.py). The connection, framing, admission and abort logic are
// the TCP backend's (tcp_transport.h; the message exchange is in tcp_ipc.cpp).
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
// One of the receiver's GPU allocations, as exported for other processes.
struct IpcAllocation {
  cuda::IpcHandle handle;
  uint64_t base = 0;           // its address in the receiver (used as is when the sender is the
                               // receiver's own process, where a handle cannot be opened)
  uint64_t process_token = 0;  // names the receiver's process (see process_token())
};
// Where one piece's destination starts in the receiver's memory.
struct IpcLocation {
  uint32_t allocation_idx = 0;  // index into the message's IpcAllocation table
  uint32_t reserved = 0;
  uint64_t offset = 0;  // from the allocation's base
};
// Who sends an IPC_WRITE: the receiver needs it when the sender hangs up mid-message.
struct IpcWriter {
  int64_t pid = 0;             // in the pid namespace pid_namespace names
  uint64_t process_token = 0;  // process_token() of the sender
  uint64_t pid_namespace = 0;  // inode of /proc/self/ns/pid (0: unknown)
};
#pragma pack(pop)
static_assert(sizeof(IpcWriter) == 24, "wire writer entry must stay 24 bytes");
static_assert(sizeof(IpcAllocation) == 80, "wire allocation entry must stay 80 bytes");
static_assert(sizeof(IpcLocation) == 16, "wire location entry must stay 16 bytes");
// Every message's allocation table fits in a frame's text (at most one allocation per piece).
static_assert(512 * sizeof(IpcAllocation) <= 64 * 1024,
              "kMaxPiecesPerMessage allocations > kMaxTextLen");

// A random number fixed for this process's lifetime.
uint64_t process_token();

// This process, as an IpcWriter.
IpcWriter this_writer();

// Receiver: after a sender hung up without reporting the end of a granted copy, waits until no copy
// of its can still run. A live sender reports before it hangs up (tcp_ipc.cpp), so a silent hang-up
// means its process is ending, and a dying process's GPU work ends before the process does: waits
// up to timeout_s for it to be gone. Our own process: nothing to wait for. A process this one
// cannot observe (another pid namespace, no /proc): waits the whole timeout_s. Returns a
// description of what was established, for error texts.
std::string wait_writer_gone(const IpcWriter& writer, double timeout_s);

// Receiver: the allocation table and locations of a message's destination ranges (this process's
// memory). Returns an error text (empty on success) when a range is not exportable GPU memory.
std::string describe_destinations(const WirePiece* pieces, size_t num_pieces,
                                  std::vector<IpcAllocation>* allocations,
                                  std::vector<IpcLocation>* locations);

// Sender: the receiver allocations this process has mapped, shared by every writer thread and
// counted per writer so that a mapping lives while any writer that opened it does.
class Mappings {
 public:
  // The local address of allocation on device (opening it on first use by `writer`) and its size.
  std::string acquire(uint64_t writer, int device, const IpcAllocation& allocation,
                      cuda::CUdeviceptr* ptr, uint64_t* nbytes);
  // Drops every mapping `writer` acquired; closes those no writer holds any more.
  void release_writer(uint64_t writer);

 private:
  struct Entry {
    int device;
    cuda::CUdeviceptr ptr;
    uint64_t nbytes;
    std::set<uint64_t> writers;
  };
  std::mutex mu_;
  std::map<std::string, Entry> entries_;  // key: device + handle bytes
};

// Sender, per writer thread: one copy stream (the device's highest priority) per source device.
class Copier {
 public:
  using CopyFn = int (*)(const uint64_t*, const uint64_t*, const uint64_t*, size_t, void*);
  // copy_fn: TransportConfig::device_copy_fn (null: the driver's copies).
  Copier(Mappings* mappings, uint64_t writer_id, CopyFn copy_fn)
      : mappings_(mappings), writer_id_(writer_id), copy_fn_(copy_fn) {}
  ~Copier();  // destroys the streams and releases the writer's mappings
  Copier(const Copier&) = delete;
  Copier& operator=(const Copier&) = delete;

  // The device of every piece's local range (*devices, one per piece), or an error text when one
  // is not CUDA device memory or crosses the end of its allocation.
  std::string locate(const std::vector<Piece>& pieces, std::vector<int>* devices);
  // Copies every piece from local memory (on devices[i], from locate) into its location in the
  // receiver's allocations and waits for the copies. Returns an error text (empty on success); on
  // error some bytes may have landed.
  std::string copy(const std::vector<Piece>& pieces, const std::vector<int>& devices,
                   const std::vector<IpcAllocation>& allocations, const IpcLocation* locations);

 private:
  Mappings* mappings_;
  uint64_t writer_id_;
  CopyFn copy_fn_;
  std::map<int, cuda::CUstream> streams_;
  bool used_driver_ = false;
};

}  // namespace pdserve::transfer::ipc
