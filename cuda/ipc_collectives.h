// One-shot collectives between the tensor-parallel ranks of one machine, through each other's
// device memory (CUDA IPC): an all-reduce and a gather, one kernel each, capturable in CUDA graphs.
// Declared in plain C++ (no CUDA headers) for the pybind11 bindings. Addresses, sizes and streams
// are raw integers; every call names its CUDA device explicitly.
//
// Each rank owns one shared region (ipc_alloc): a signal area (per-block arrival flags, written by
// the peers) and two data halves of `capacity` bytes. A call copies this rank's input into the half
// picked by the call's parity, meets the peers at a per-block barrier (release/acquire flags at
// system scope), then reads every rank's half. Two halves make one barrier per call enough: a rank
// can only be one call ahead of the slowest peer, and that call uses the other half.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pdserve {
namespace cuda {

constexpr int kIpcMaxRanks = 8;
constexpr int kIpcMaxBlocks = 64;       // CTAs per call; one flag slot per (CTA, rank)
constexpr int kIpcSignalNbytes = 4096;  // the signal area at the start of each region

// dtype codes of ipc_all_reduce
enum IpcDtype : int { kIpcFloat32 = 0, kIpcFloat16 = 1, kIpcBfloat16 = 2 };

// Device memory for one rank's shared region (kIpcSignalNbytes + 2 * capacity bytes), zeroed.
uint64_t ipc_alloc(int device, uint64_t nbytes);
void ipc_free(int device, uint64_t addr);
// The CUDA IPC handle (64 bytes) of a region allocated by ipc_alloc in this process.
std::string ipc_handle(int device, uint64_t addr);
// Maps a peer's region into this process on `device` (peer access enabled lazily); ipc_close undoes
// it.
uint64_t ipc_open(int device, const std::string& handle);
void ipc_close(int device, uint64_t addr);

struct IpcCall {
  int device = 0;
  std::vector<uint64_t> regions;  // every rank's region as mapped here (index = rank)
  int rank = 0;
  uint64_t counters_addr = 0;  // this rank's device uint32[kIpcMaxBlocks], zeroed once
  uint64_t abort_addr = 0;     // mapped pinned host int32: non-zero makes waiting CTAs give up
  uint64_t capacity = 0;       // bytes of one data half
  uint64_t timeout_ns =
      0;  // a CTA waiting longer for a peer traps (the peer is dead or out of step)
};

// out = sum over ranks of in (nbytes of `dtype`, summed in fp32 in rank order, so every rank gets
// the same bits). in == out is allowed. nbytes: a multiple of 16, at most capacity; in/out 16-byte
// aligned. Enqueued on `stream` (a cudaStream_t of call.device as an integer).
void ipc_all_reduce(const IpcCall& call, uint64_t in_addr, uint64_t out_addr, uint64_t nbytes,
                    int dtype, uint64_t stream);

// Rank r's nbytes of `in` land at out + r * out_rank_stride on `root` (every rank when root < 0);
// the other ranks only contribute. Same size and alignment rules as ipc_all_reduce.
void ipc_gather(const IpcCall& call, uint64_t in_addr, uint64_t out_addr, uint64_t nbytes,
                uint64_t out_rank_stride, int root, uint64_t stream);

}  // namespace cuda
}  // namespace pdserve
