// Kernels and launchers of the IPC collectives (see ipc_collectives.h for the protocol).
//
// Ordering: each CTA copies its share of the input into this rank's half, then (__syncthreads, then
// one thread per peer) stores its epoch into that peer's flag slot with st.release.sys, and waits
// with ld.acquire.sys until every peer's slot for this CTA holds the epoch. CTA b reads exactly the
// vectors that CTA b of every peer wrote (same grid, same grid-stride split), so a per-CTA barrier
// suffices. Epochs come from per-CTA counters in device memory (not kernel arguments), so a
// captured graph replays correctly; every rank issues the same calls with the same grids, so
// counters stay equal.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>

#include "ipc_collectives.h"
#include "launch_errors.h"

namespace pdserve {
namespace cuda {
namespace {

constexpr int kThreads = 512;
static_assert(kIpcMaxBlocks * kIpcMaxRanks * sizeof(uint32_t) <= kIpcSignalNbytes,
              "flag slots must fit the signal area");

struct Args {
  uint8_t* regions[kIpcMaxRanks];
  uint32_t* counters;
  const volatile int32_t* abort_flag;
  const uint8_t* in;
  uint8_t* out;
  uint64_t nvec;  // 16-byte vectors per rank
  uint64_t capacity;
  uint64_t out_rank_stride_vec;
  uint64_t timeout_ns;
  int rank;
  int root;
};

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint32_t* flag_slot(uint8_t* region, int block, int from_rank) {
  return reinterpret_cast<uint32_t*>(region) + block * kIpcMaxRanks + from_rank;
}

// This CTA's epoch for the call (its counter, incremented).
__device__ __forceinline__ uint32_t next_epoch(const Args& a) {
  __shared__ uint32_t epoch;
  if (threadIdx.x == 0) {
    epoch = a.counters[blockIdx.x] + 1;
    a.counters[blockIdx.x] = epoch;
  }
  __syncthreads();
  return epoch;
}

// Returns once CTA blockIdx.x of every rank has passed its copy phase of this epoch.
template <int W>
__device__ __forceinline__ void barrier(const Args& a, uint32_t epoch) {
  __syncthreads();  // this CTA's share of the data is written
  if (threadIdx.x < W) {
    st_release_sys(flag_slot(a.regions[threadIdx.x], blockIdx.x, a.rank), epoch);
    const uint32_t* mine = flag_slot(a.regions[a.rank], blockIdx.x, threadIdx.x);
    // a peer may already be one call ahead: wait for "at least epoch" (wrap-around safe)
    if (static_cast<int32_t>(ld_acquire_sys(mine) - epoch) < 0) {
      const uint64_t start = global_timer_ns();
      uint32_t spins = 0;
      while (static_cast<int32_t>(ld_acquire_sys(mine) - epoch) < 0) {
        if ((++spins & 1023) != 0) continue;
        if (*a.abort_flag != 0) break;  // the host gave up on the group: leave with garbage
        if (global_timer_ns() - start > a.timeout_ns) {
          printf(
              "pdserve IPC collective: rank %d CTA %d waited over %llu ms for rank %d (epoch %u): "
              "the peer is dead or out of step\n",
              a.rank, blockIdx.x, static_cast<unsigned long long>(a.timeout_ns / 1000000),
              static_cast<int>(threadIdx.x), epoch);
          __trap();
        }
      }
    }
  }
  __syncthreads();
}

__device__ __forceinline__ uint4* half_of(uint8_t* region, uint32_t epoch, uint64_t capacity) {
  return reinterpret_cast<uint4*>(region + kIpcSignalNbytes + (epoch & 1u) * capacity);
}

// ---- element types of the reduction: a 16-byte vector <-> fp32 accumulators
// ----------------------
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int kCount = 4;
  __device__ static void add(float* acc, const uint4& v) {
    const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] += f[i];
  }
  __device__ static uint4 pack(const float* acc) {
    uint4 v;
    float* f = reinterpret_cast<float*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = acc[i];
    return v;
  }
};

// bf16 / fp16: eight lanes as four pairs, converted through Pair<T2>
template <typename T2>
struct Pair;

template <>
struct Pair<__half2> {
  __device__ static float2 to_float2(__half2 v) { return __half22float2(v); }
  __device__ static __half2 from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};

template <>
struct Pair<__nv_bfloat162> {
  __device__ static float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
  __device__ static __nv_bfloat162 from_floats(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
};

template <typename T2>
struct PairLanes {
  static constexpr int kCount = 8;
  __device__ static void add(float* acc, const uint4& v) {
    const T2* h = reinterpret_cast<const T2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = Pair<T2>::to_float2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static uint4 pack(const float* acc) {
    uint4 v;
    T2* h = reinterpret_cast<T2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = Pair<T2>::from_floats(acc[2 * i], acc[2 * i + 1]);
    return v;
  }
};

template <>
struct Lanes<__half> : PairLanes<__half2> {};

template <>
struct Lanes<__nv_bfloat16> : PairLanes<__nv_bfloat162> {};

// ---- kernels
// -------------------------------------------------------------------------------------
template <typename T, int W>
__global__ void __launch_bounds__(kThreads) all_reduce_kernel(Args a) {
  const uint32_t epoch = next_epoch(a);
  const uint4* in = reinterpret_cast<const uint4*>(a.in);
  const uint64_t first = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  uint4* mine = half_of(a.regions[a.rank], epoch, a.capacity);
  for (uint64_t i = first; i < a.nvec; i += stride) mine[i] = in[i];
  barrier<W>(a, epoch);
  const uint4* src[W];
#pragma unroll
  for (int r = 0; r < W; ++r) src[r] = r == a.rank ? in : half_of(a.regions[r], epoch, a.capacity);
  uint4* out = reinterpret_cast<uint4*>(a.out);
  for (uint64_t i = first; i < a.nvec; i += stride) {
    float acc[Lanes<T>::kCount] = {};
#pragma unroll
    for (int r = 0; r < W; ++r) Lanes<T>::add(acc, src[r][i]);
    out[i] = Lanes<T>::pack(acc);
  }
}

template <int W>
__global__ void __launch_bounds__(kThreads) gather_kernel(Args a) {
  const uint32_t epoch = next_epoch(a);
  const uint4* in = reinterpret_cast<const uint4*>(a.in);
  const uint64_t first = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  uint4* mine = half_of(a.regions[a.rank], epoch, a.capacity);
  for (uint64_t i = first; i < a.nvec; i += stride) mine[i] = in[i];
  barrier<W>(a, epoch);
  if (a.root >= 0 && a.root != a.rank) return;
  uint4* out = reinterpret_cast<uint4*>(a.out);
#pragma unroll
  for (int r = 0; r < W; ++r) {
    const uint4* src = r == a.rank ? in : half_of(a.regions[r], epoch, a.capacity);
    uint4* dst = out + r * a.out_rank_stride_vec;
    for (uint64_t i = first; i < a.nvec; i += stride) dst[i] = src[i];
  }
}

// ---- host side
// -----------------------------------------------------------------------------------
void check(const char* op, const char* step, cudaError_t err) {
  if (err != cudaSuccess) fail_cuda(op, step, err);
}

void set_device(const char* op, int device) { check(op, "cudaSetDevice", cudaSetDevice(device)); }

Args make_args(const char* op, const IpcCall& call, uint64_t in_addr, uint64_t out_addr,
               uint64_t nbytes) {
  const int world = static_cast<int>(call.regions.size());
  if (world < 1 || world > kIpcMaxRanks) {
    fail_argument(op,
                  std::to_string(world) + " regions; expected 1.." + std::to_string(kIpcMaxRanks));
  }
  if (call.rank < 0 || call.rank >= world) {
    fail_argument(op,
                  "rank " + std::to_string(call.rank) + " outside 0.." + std::to_string(world - 1));
  }
  if (nbytes % 16 != 0 || nbytes > call.capacity) {
    fail_argument(
        op, "nbytes=" + std::to_string(nbytes) +
                " must be a multiple of 16 and at most capacity=" + std::to_string(call.capacity));
  }
  if (in_addr == 0 || out_addr == 0 || call.counters_addr == 0 || call.abort_addr == 0 ||
      (in_addr | out_addr) % 16 != 0) {
    fail_argument(op, "in/out/counters/abort addresses must be non-null, in/out 16-byte aligned");
  }
  Args a{};
  for (int r = 0; r < world; ++r) {
    if (call.regions[r] == 0) fail_argument(op, "region of rank " + std::to_string(r) + " is null");
    a.regions[r] = reinterpret_cast<uint8_t*>(call.regions[r]);
  }
  a.counters = reinterpret_cast<uint32_t*>(call.counters_addr);
  a.abort_flag = reinterpret_cast<const volatile int32_t*>(call.abort_addr);
  a.in = reinterpret_cast<const uint8_t*>(in_addr);
  a.out = reinterpret_cast<uint8_t*>(out_addr);
  a.nvec = nbytes / 16;
  a.capacity = call.capacity;
  a.timeout_ns = call.timeout_ns;
  a.rank = call.rank;
  a.root = -1;
  return a;
}

dim3 grid_for(uint64_t nvec) {
  const uint64_t blocks = (nvec + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(std::clamp<uint64_t>(blocks, 1, kIpcMaxBlocks)));
}

template <int W>
struct Reduce {
  static void run(const Args& a, int dtype, cudaStream_t stream) {
    const dim3 grid = grid_for(a.nvec);
    switch (dtype) {
      case kIpcFloat32:
        all_reduce_kernel<float, W><<<grid, kThreads, 0, stream>>>(a);
        break;
      case kIpcFloat16:
        all_reduce_kernel<__half, W><<<grid, kThreads, 0, stream>>>(a);
        break;
      default:
        all_reduce_kernel<__nv_bfloat16, W><<<grid, kThreads, 0, stream>>>(a);
        break;
    }
  }
};

template <int W>
struct Gather {
  static void run(const Args& a, int, cudaStream_t stream) {
    gather_kernel<W><<<grid_for(a.nvec), kThreads, 0, stream>>>(a);
  }
};

// Runs Launch<W>::run(args...) for the runtime world size (1..kIpcMaxRanks).
template <template <int> class Launch, typename... T>
void dispatch_world(int world, const T&... args) {
  switch (world) {
    case 1:
      Launch<1>::run(args...);
      break;
    case 2:
      Launch<2>::run(args...);
      break;
    case 3:
      Launch<3>::run(args...);
      break;
    case 4:
      Launch<4>::run(args...);
      break;
    case 5:
      Launch<5>::run(args...);
      break;
    case 6:
      Launch<6>::run(args...);
      break;
    case 7:
      Launch<7>::run(args...);
      break;
    default:
      Launch<8>::run(args...);
      break;
  }
}

}  // namespace

uint64_t ipc_alloc(int device, uint64_t nbytes) {
  const char* op = "ipc_alloc";
  if (nbytes == 0) fail_argument(op, "nbytes must be > 0");
  set_device(op, device);
  void* ptr = nullptr;
  check(op, "cudaMalloc", cudaMalloc(&ptr, nbytes));
  cudaError_t err = cudaMemset(ptr, 0, nbytes);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    cudaFree(ptr);
    fail_cuda(op, "cudaMemset", err);
  }
  return reinterpret_cast<uint64_t>(ptr);
}

void ipc_free(int device, uint64_t addr) {
  set_device("ipc_free", device);
  check("ipc_free", "cudaFree", cudaFree(reinterpret_cast<void*>(addr)));
}

std::string ipc_handle(int device, uint64_t addr) {
  const char* op = "ipc_handle";
  set_device(op, device);
  cudaIpcMemHandle_t handle;
  check(op, "cudaIpcGetMemHandle", cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(addr)));
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

uint64_t ipc_open(int device, const std::string& handle) {
  const char* op = "ipc_open";
  cudaIpcMemHandle_t h;
  if (handle.size() != sizeof(h)) {
    fail_argument(op, "handle of " + std::to_string(handle.size()) + " bytes; expected " +
                          std::to_string(sizeof(h)));
  }
  std::copy(handle.begin(), handle.end(), reinterpret_cast<char*>(&h));
  set_device(op, device);
  void* ptr = nullptr;
  check(op, "cudaIpcOpenMemHandle", cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess));
  return reinterpret_cast<uint64_t>(ptr);
}

void ipc_close(int device, uint64_t addr) {
  set_device("ipc_close", device);
  check("ipc_close", "cudaIpcCloseMemHandle", cudaIpcCloseMemHandle(reinterpret_cast<void*>(addr)));
}

void ipc_all_reduce(const IpcCall& call, uint64_t in_addr, uint64_t out_addr, uint64_t nbytes,
                    int dtype, uint64_t stream) {
  const char* op = "ipc_all_reduce";
  if (dtype < kIpcFloat32 || dtype > kIpcBfloat16) {
    fail_argument(op, "dtype code " + std::to_string(dtype) +
                          "; expected 0 (float32), "
                          "1 (float16) or 2 (bfloat16)");
  }
  const Args a = make_args(op, call, in_addr, out_addr, nbytes);
  if (a.nvec == 0) return;
  set_device(op, call.device);
  dispatch_world<Reduce>(static_cast<int>(call.regions.size()), a, dtype,
                         reinterpret_cast<cudaStream_t>(stream));
  check(op, "kernel launch", cudaGetLastError());
}

void ipc_gather(const IpcCall& call, uint64_t in_addr, uint64_t out_addr, uint64_t nbytes,
                uint64_t out_rank_stride, int root, uint64_t stream) {
  const char* op = "ipc_gather";
  Args a = make_args(op, call, in_addr, out_addr, nbytes);
  const int world = static_cast<int>(call.regions.size());
  if (root >= world) {
    fail_argument(op, "root " + std::to_string(root) + " outside 0.." + std::to_string(world - 1));
  }
  if (out_rank_stride % 16 != 0 || out_rank_stride < nbytes) {
    fail_argument(op, "out_rank_stride=" + std::to_string(out_rank_stride) +
                          " must be a multiple of 16 and at least nbytes");
  }
  a.root = root < 0 ? -1 : root;
  a.out_rank_stride_vec = out_rank_stride / 16;
  if (a.nvec == 0) return;
  set_device(op, call.device);
  dispatch_world<Gather>(world, a, 0, reinterpret_cast<cudaStream_t>(stream));
  check(op, "kernel launch", cudaGetLastError());
}

}  // namespace cuda
}  // namespace pdserve
