// The few CUDA driver API calls the CUDA-IPC backend needs, resolved at run time from libcuda.so.1
// (the driver every CUDA process loads), so the transfer library builds and runs without a CUDA
// toolkit and fails with a clear error only when a GPU backend is asked for on a machine without
// one.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace pdserve::transfer::cuda {

using CUdeviceptr = uint64_t;
using CUstream = void*;  // cudaStream_t and CUstream are the same handle
using CUevent = void*;   // cudaEvent_t and CUevent are the same handle
using CUcontext = void*;

constexpr size_t kIpcHandleNbytes = 64;  // CU_IPC_HANDLE_SIZE
struct IpcHandle {
  unsigned char bytes[kIpcHandleNbytes];
};

// A failed driver call: the function's name and the driver's own error text.
struct Error {
  std::string text;  // empty: success
  bool ok() const { return text.empty(); }
};

// Process-wide driver entry points. Every method is thread-safe; every call makes `device`'s
// primary context (the one torch uses) current on the calling thread first.
class Driver {
 public:
  // The loaded driver, or throws TransferError saying why there is none (no libcuda.so.1, cuInit
  // failed: no GPU visible).
  static Driver& get();

  // The device ordinal of a pointer the driver knows as device memory; an error for host memory.
  Error device_of(CUdeviceptr ptr, int* device);
  // The allocation [*lo, *hi) that contains ptr (device memory of `device`).
  Error address_range(int device, CUdeviceptr ptr, CUdeviceptr* lo, CUdeviceptr* hi);
  // The allocation [base, base + nbytes) that contains ptr and its exportable IPC handle. Fails for
  // memory that cannot be exported (host memory, memory imported from another process, virtual
  // memory such as torch's expandable segments).
  Error export_allocation(CUdeviceptr ptr, IpcHandle* handle, CUdeviceptr* base, uint64_t* nbytes);
  // Maps another process's allocation into this one on `device`; returns its address and size.
  Error open_handle(int device, const IpcHandle& handle, CUdeviceptr* ptr, uint64_t* nbytes);
  Error close_handle(int device, CUdeviceptr ptr);
  // A stream that does not synchronise with the legacy default stream, at the device's highest
  // priority: its work is scheduled ahead of queued work of default-priority streams.
  Error create_priority_stream(int device, CUstream* stream);
  Error destroy_stream(int device, CUstream stream);
  // Enqueues asynchronous copies dsts[i] <- srcs[i] of sizes[i] bytes between any addresses the
  // driver knows (unified addressing): one cuMemcpyBatchAsync where the driver has it (CUDA 12.8+),
  // else one cuMemcpyAsync per copy. The arrays are read during the call only.
  Error copy_async(int device, const std::vector<CUdeviceptr>& dsts,
                   const std::vector<CUdeviceptr>& srcs, const std::vector<size_t>& sizes,
                   CUstream stream);
  Error sync_stream(int device, CUstream stream);
  // Makes device's primary context current on this thread (for calls into the CUDA runtime).
  Error use_device(int device) { return make_current(device); }
  // A new event of this library's that completes once `event` (created by any API in this process,
  // recorded on any stream of device) completes: the caller's event may be destroyed as soon as
  // this returns. Destroy *own with destroy_event. Waiting on it spins (see chain_event).
  Error chain_event(int device, CUevent event, CUevent* own);
  Error destroy_event(int device, CUevent event);
  // Blocks until the work recorded into event completed.
  Error sync_event(int device, CUevent event);

 private:
  Driver();
  Error make_current(int device);
  Error check(int result, const char* what);

  void* lib_ = nullptr;
  std::mutex mu_;
  std::unordered_map<int, CUcontext> contexts_;  // retained primary contexts, never released
  struct Exported {
    IpcHandle handle;
    CUdeviceptr base;
    uint64_t nbytes;
  };
  std::unordered_map<uint64_t, Exported> exported_;  // by CU_POINTER_ATTRIBUTE_BUFFER_ID
  std::unordered_map<int, CUstream> event_streams_;  // chain_event's stream per device

  // Entry points (CUresult is an int; CUdevice an int).
  int (*cuInit_)(unsigned) = nullptr;
  int (*cuGetErrorString_)(int, const char**) = nullptr;
  int (*cuDeviceGet_)(int*, int) = nullptr;
  int (*cuDevicePrimaryCtxRetain_)(CUcontext*, int) = nullptr;
  int (*cuCtxSetCurrent_)(CUcontext) = nullptr;
  int (*cuPointerGetAttribute_)(void*, int, CUdeviceptr) = nullptr;
  int (*cuMemGetAddressRange_)(CUdeviceptr*, size_t*, CUdeviceptr) = nullptr;
  int (*cuIpcGetMemHandle_)(IpcHandle*, CUdeviceptr) = nullptr;
  int (*cuIpcOpenMemHandle_)(CUdeviceptr*, IpcHandle, unsigned) = nullptr;
  int (*cuIpcCloseMemHandle_)(CUdeviceptr) = nullptr;
  int (*cuStreamCreate_)(CUstream*, unsigned) = nullptr;
  int (*cuStreamCreateWithPriority_)(CUstream*, unsigned, int) = nullptr;
  int (*cuCtxGetStreamPriorityRange_)(int*, int*) = nullptr;
  int (*cuStreamDestroy_)(CUstream) = nullptr;
  int (*cuStreamSynchronize_)(CUstream) = nullptr;
  int (*cuMemcpyAsync_)(CUdeviceptr, CUdeviceptr, size_t, CUstream) = nullptr;
  int (*cuEventSynchronize_)(CUevent) = nullptr;
  int (*cuEventCreate_)(CUevent*, unsigned) = nullptr;
  int (*cuEventDestroy_)(CUevent) = nullptr;
  int (*cuEventRecord_)(CUevent, CUstream) = nullptr;
  int (*cuStreamWaitEvent_)(CUstream, CUevent, unsigned) = nullptr;
  // Optional (null where the driver lacks them): the CUDA 13 and the CUDA 12.8 batch copy.
  int (*cuMemcpyBatchAsync_v2_)(CUdeviceptr*, CUdeviceptr*, size_t*, size_t, void*, size_t*, size_t,
                                CUstream) = nullptr;
  int (*cuMemcpyBatchAsync_v1_)(CUdeviceptr*, CUdeviceptr*, size_t*, size_t, void*, size_t*, size_t,
                                size_t*, CUstream) = nullptr;
};

}  // namespace pdserve::transfer::cuda
