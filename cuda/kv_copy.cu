// Launchers of the KV piece copy kernels: validate every argument, pick the kernel instance the
// alignment allows, size the grid to one resident wave, and turn CUDA errors into exceptions that
// name the call and the values seen.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "kv_copy.h"
#include "kv_copy_kernels.cuh"
#include "launch_errors.h"

namespace pdserve {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kMaxDevices = 64;

int current_device(const char* op) {
  int device = -1;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) fail_cuda(op, "cudaGetDevice", err);
  if (device < 0 || device >= kMaxDevices) {
    fail_argument(op, "current CUDA device " + std::to_string(device) + " is out of range");
  }
  return device;
}

// Returns the device-accessible address of `addr` after checking that it is device memory of
// `device`, managed memory, or (when allow_host) pinned host memory mapped into the device's
// address space. Pageable host memory and other devices' memory are rejected with the reason.
uint64_t device_accessible(const char* op, const char* name, uint64_t addr, int device,
                           bool allow_host) {
  if (addr == 0) fail_argument(op, std::string(name) + " is a null pointer");
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(addr));
  if (err != cudaSuccess) {
    cudaGetLastError();  // the failed query must not poison the next launch's error check
    std::ostringstream msg;
    msg << name << "=0x" << std::hex << addr << std::dec << " is not a CUDA-known address ("
        << cudaGetErrorString(err) << ")";
    fail_argument(op, msg.str());
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
      if (attr.device != device) {
        fail_argument(op, std::string(name) + " is memory of CUDA device " +
                              std::to_string(attr.device) + " but the current device is " +
                              std::to_string(device));
      }
      return addr;
    case cudaMemoryTypeManaged:
      return addr;
    case cudaMemoryTypeHost:
      if (!allow_host) {
        fail_argument(op, std::string(name) + " is pinned host memory; it must be device memory");
      }
      if (attr.devicePointer == nullptr) {
        fail_argument(op, std::string(name) +
                              " is pinned host memory that is not mapped into the device's "
                              "address space");
      }
      return reinterpret_cast<uint64_t>(attr.devicePointer);
    default:
      fail_argument(op, std::string(name) +
                            " is pageable host memory; expected device memory" +
                            (allow_host ? " or pinned host memory (pin_memory())" : ""));
  }
}

void check_count(const char* op, const char* name, int64_t value, int64_t min_value) {
  if (value < min_value || value > std::numeric_limits<int32_t>::max()) {
    fail_argument(op, std::string(name) + "=" + std::to_string(value) + " is outside [" +
                          std::to_string(min_value) + ", 2^31-1]");
  }
}

void check_pool(const char* op, const char* side, int64_t stride_nbytes, int64_t num_blocks,
                int64_t piece_nbytes) {
  std::string stride_name = std::string(side) + "_stride_nbytes";
  std::string blocks_name = std::string(side) + "_num_blocks";
  if (stride_nbytes < piece_nbytes) {
    fail_argument(op, stride_name + "=" + std::to_string(stride_nbytes) +
                          " is smaller than piece_nbytes=" + std::to_string(piece_nbytes) +
                          " (pieces of different blocks would overlap)");
  }
  check_count(op, blocks_name.c_str(), num_blocks, 1);
  if (stride_nbytes > std::numeric_limits<int64_t>::max() / num_blocks) {
    fail_argument(op, stride_name + " * " + blocks_name + " overflows 64 bits");
  }
}

int sm_count(const char* op, int device) {
  static std::atomic<int> cache[kMaxDevices];
  int count = cache[device].load(std::memory_order_relaxed);
  if (count > 0) return count;
  cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) fail_cuda(op, "cudaDeviceGetAttribute(MultiProcessorCount)", err);
  cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Resident CTAs per SM for one kernel instance, queried once per device.
template <typename Vec, int kUnroll, CacheHint kHint>
int blocks_per_sm(const char* op, int device) {
  static std::atomic<int> cache[kMaxDevices];
  int count = cache[device].load(std::memory_order_relaxed);
  if (count > 0) return count;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &count, copy_pieces_kernel<Vec, kUnroll, kHint>, kThreadsPerBlock, 0);
  if (err != cudaSuccess) fail_cuda(op, "cudaOccupancyMaxActiveBlocksPerMultiprocessor", err);
  count = std::max(count, 1);
  cache[device].store(count, std::memory_order_relaxed);
  return count;
}

int64_t tiles_for(const PieceCopyParams& p, int vec_nbytes, int unroll) {
  const int64_t tile_nbytes = static_cast<int64_t>(kThreadsPerBlock) * vec_nbytes * unroll;
  return (p.piece_nbytes + tile_nbytes - 1) / tile_nbytes * p.num_pieces;
}

template <typename Vec, int kUnroll, CacheHint kHint>
void launch(const char* op, const PieceCopyParams& p, cudaStream_t stream, int device) {
  const int64_t num_tiles = tiles_for(p, static_cast<int>(sizeof(Vec)), kUnroll);
  if (num_tiles == 0) return;
  const int64_t wave = static_cast<int64_t>(sm_count(op, device)) *
                       blocks_per_sm<Vec, kUnroll, kHint>(op, device);
  const unsigned grid = static_cast<unsigned>(std::min(num_tiles, wave));
  copy_pieces_kernel<Vec, kUnroll, kHint><<<grid, kThreadsPerBlock, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail_cuda(op, "kernel launch", err);
}

// Widest power-of-two access (<= 16 bytes) that every address, stride and size is a multiple of.
int vector_nbytes(const PieceCopyParams& p) {
  const uint64_t bits = reinterpret_cast<uint64_t>(p.src_base) |
                        reinterpret_cast<uint64_t>(p.dst_base) |
                        static_cast<uint64_t>(p.src_stride_nbytes) |
                        static_cast<uint64_t>(p.dst_stride_nbytes) |
                        static_cast<uint64_t>(p.piece_nbytes);
  const uint64_t lowest = bits & (~bits + 1);
  return static_cast<int>(std::min<uint64_t>(lowest, 16));
}

void dispatch(const char* op, const PieceCopyParams& p, uint64_t stream_handle, int version,
              int device) {
  if (version < 0 || version >= kNumKernelVersions) {
    fail_argument(op, "version=" + std::to_string(version) + " is not a kernel version (0.." +
                          std::to_string(kNumKernelVersions - 1) + ")");
  }
  if (p.num_pieces == 0) return;
  const int vec = vector_nbytes(p);
  if (version == kAuto) {
    // Measured (H100, 1 MiB .. 2 GiB per call): streaming hints win most at small sizes (the
    // copy is latency-bound there) and tie elsewhere; smaller tiles for small copies did not help.
    version = vec < 16 ? kNarrow : kVec16Unroll4Stream;
  } else if (version != kNarrow && vec < 16) {
    fail_argument(op, "kernel version " + kernel_version_name(version) +
                          " needs 16-byte aligned addresses, strides and piece_nbytes; the "
                          "widest common alignment is " +
                          std::to_string(vec) + " bytes");
  }
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (version) {
    case kVec16Unroll1:
      return launch<uint4, 1, CacheHint::kDefault>(op, p, stream, device);
    case kVec16Unroll4:
      return launch<uint4, 4, CacheHint::kDefault>(op, p, stream, device);
    case kVec16Unroll8:
      return launch<uint4, 8, CacheHint::kDefault>(op, p, stream, device);
    case kVec16Unroll4Stream:
      return launch<uint4, 4, CacheHint::kStreaming>(op, p, stream, device);
    case kVec16Unroll8Stream:
      return launch<uint4, 8, CacheHint::kStreaming>(op, p, stream, device);
    default:  // kNarrow
      switch (std::min(vec, 8)) {
        case 8:
          return launch<uint2, 4, CacheHint::kDefault>(op, p, stream, device);
        case 4:
          return launch<uint32_t, 4, CacheHint::kDefault>(op, p, stream, device);
        case 2:
          return launch<uint16_t, 4, CacheHint::kDefault>(op, p, stream, device);
        default:
          return launch<uint8_t, 4, CacheHint::kDefault>(op, p, stream, device);
      }
  }
}

// Shared checks of the three entry points; returns the launch description.
// A null ids name means that side is packed (ids 0..num_pieces-1, no id array).
PieceCopyParams make_params(const char* op, uint64_t src_addr, int64_t src_stride_nbytes,
                            int64_t src_num_blocks, uint64_t dst_addr, int64_t dst_stride_nbytes,
                            int64_t dst_num_blocks, const char* src_ids_name,
                            uint64_t src_ids_addr, const char* dst_ids_name,
                            uint64_t dst_ids_addr, int64_t num_pieces, int64_t piece_nbytes,
                            int device) {
  const bool has_src_ids = src_ids_name != nullptr;
  const bool has_dst_ids = dst_ids_name != nullptr;
  if (piece_nbytes <= 0) {
    fail_argument(op, "piece_nbytes=" + std::to_string(piece_nbytes) + " must be positive");
  }
  check_count(op, "num_ids", num_pieces, 0);
  check_pool(op, "src", src_stride_nbytes, src_num_blocks, piece_nbytes);
  check_pool(op, "dst", dst_stride_nbytes, dst_num_blocks, piece_nbytes);
  if (!has_src_ids && num_pieces > src_num_blocks) {
    fail_argument(op, "num_ids=" + std::to_string(num_pieces) + " exceeds the " +
                          std::to_string(src_num_blocks) + " pieces of the packed source");
  }
  if (!has_dst_ids && num_pieces > dst_num_blocks) {
    fail_argument(op, "num_ids=" + std::to_string(num_pieces) + " exceeds the " +
                          std::to_string(dst_num_blocks) + " pieces of the packed destination");
  }
  PieceCopyParams p{};
  p.src_base = reinterpret_cast<const char*>(device_accessible(op, "src", src_addr, device, true));
  p.dst_base = reinterpret_cast<char*>(device_accessible(op, "dst", dst_addr, device, true));
  if (num_pieces > 0 && has_src_ids) {
    p.src_ids = reinterpret_cast<const int32_t*>(
        device_accessible(op, src_ids_name, src_ids_addr, device, false));
    if (src_ids_addr % alignof(int32_t) != 0) {
      fail_argument(op, std::string(src_ids_name) + " is not 4-byte aligned");
    }
  }
  if (num_pieces > 0 && has_dst_ids) {
    p.dst_ids = reinterpret_cast<const int32_t*>(
        device_accessible(op, dst_ids_name, dst_ids_addr, device, false));
    if (dst_ids_addr % alignof(int32_t) != 0) {
      fail_argument(op, std::string(dst_ids_name) + " is not 4-byte aligned");
    }
  }
  p.src_stride_nbytes = src_stride_nbytes;
  p.dst_stride_nbytes = dst_stride_nbytes;
  p.piece_nbytes = piece_nbytes;
  p.src_num_blocks = static_cast<int32_t>(src_num_blocks);
  p.dst_num_blocks = static_cast<int32_t>(dst_num_blocks);
  p.num_pieces = static_cast<int32_t>(num_pieces);
  return p;
}

}  // namespace

std::string kernel_version_name(int version) {
  switch (version) {
    case kAuto:
      return "auto";
    case kVec16Unroll1:
      return "vec16x1";
    case kVec16Unroll4:
      return "vec16x4";
    case kVec16Unroll8:
      return "vec16x8";
    case kVec16Unroll4Stream:
      return "vec16x4-stream";
    case kNarrow:
      return "narrow";
    case kVec16Unroll8Stream:
      return "vec16x8-stream";
    default:
      throw std::invalid_argument("unknown kernel version " + std::to_string(version));
  }
}

void gather_blocks(uint64_t src_addr, int64_t block_stride_nbytes, int64_t src_num_blocks,
                   uint64_t block_ids_addr, int64_t num_ids, uint64_t dst_addr,
                   int64_t piece_nbytes, uint64_t stream, int version) {
  const char* op = "gather_blocks";
  const int device = current_device(op);
  // The packed side is [num_ids, piece_nbytes]; at least one row so its checks stay meaningful.
  const int64_t packed_rows = std::max<int64_t>(num_ids, 1);
  PieceCopyParams p = make_params(op, src_addr, block_stride_nbytes, src_num_blocks, dst_addr,
                                  piece_nbytes, packed_rows, "block_ids", block_ids_addr, nullptr, 0,
                                  num_ids, piece_nbytes, device);
  dispatch(op, p, stream, version, device);
}

void scatter_blocks(uint64_t src_addr, uint64_t block_ids_addr, int64_t num_ids, uint64_t dst_addr,
                    int64_t block_stride_nbytes, int64_t dst_num_blocks, int64_t piece_nbytes,
                    uint64_t stream, int version) {
  const char* op = "scatter_blocks";
  const int device = current_device(op);
  const int64_t packed_rows = std::max<int64_t>(num_ids, 1);
  PieceCopyParams p = make_params(op, src_addr, piece_nbytes, packed_rows, dst_addr,
                                  block_stride_nbytes, dst_num_blocks, nullptr, 0, "block_ids",
                                  block_ids_addr, num_ids, piece_nbytes, device);
  dispatch(op, p, stream, version, device);
}

void copy_blocks(uint64_t src_addr, int64_t src_stride_nbytes, int64_t src_num_blocks,
                 uint64_t dst_addr, int64_t dst_stride_nbytes, int64_t dst_num_blocks,
                 uint64_t src_ids_addr, uint64_t dst_ids_addr, int64_t num_pairs,
                 int64_t piece_nbytes, uint64_t stream, int version) {
  const char* op = "copy_blocks";
  const int device = current_device(op);
  PieceCopyParams p = make_params(op, src_addr, src_stride_nbytes, src_num_blocks, dst_addr,
                                  dst_stride_nbytes, dst_num_blocks, "src_ids", src_ids_addr,
                                  "dst_ids", dst_ids_addr, num_pairs, piece_nbytes, device);
  dispatch(op, p, stream, version, device);
}

}  // namespace cuda
}  // namespace pdserve
