// Resolves the CUDA driver API from libcuda.so.1 at run time (see cuda_driver.h for why).
#include "cuda_driver.h"

#include <dlfcn.h>

#include "pdserve/transfer/types.h"

namespace pdserve::transfer::cuda {
namespace {

constexpr int kSuccess = 0;
constexpr int kPointerAttributeBufferId = 7;       // CU_POINTER_ATTRIBUTE_BUFFER_ID
constexpr int kPointerAttributeDeviceOrdinal = 9;  // CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
constexpr unsigned kIpcLazyEnablePeerAccess = 1;   // CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
constexpr unsigned kStreamNonBlocking = 1;         // CU_STREAM_NON_BLOCKING
constexpr unsigned kEventDisableTiming = 2;        // CU_EVENT_DISABLE_TIMING

template <typename F>
void resolve(void* lib, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  if (*fn == nullptr) {
    throw TransferError(std::string("the CUDA driver (libcuda.so.1) has no ") + name +
                        ": it is older than CUDA 11");
  }
}

}  // namespace

Driver& Driver::get() {
  static Driver driver;  // a failed construction throws again on the next call
  return driver;
}

Driver::Driver() {
  lib_ = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib_ == nullptr) {
    const char* why = dlerror();
    throw TransferError(std::string("the cuda_ipc backend needs the CUDA driver, but "
                                    "libcuda.so.1 cannot be loaded: ") +
                        (why ? why : "unknown error"));
  }
  resolve(lib_, "cuInit", &cuInit_);
  resolve(lib_, "cuGetErrorString", &cuGetErrorString_);
  resolve(lib_, "cuDeviceGet", &cuDeviceGet_);
  resolve(lib_, "cuDevicePrimaryCtxRetain", &cuDevicePrimaryCtxRetain_);
  resolve(lib_, "cuCtxSetCurrent", &cuCtxSetCurrent_);
  resolve(lib_, "cuPointerGetAttribute", &cuPointerGetAttribute_);
  resolve(lib_, "cuMemGetAddressRange_v2", &cuMemGetAddressRange_);
  resolve(lib_, "cuIpcGetMemHandle", &cuIpcGetMemHandle_);
  resolve(lib_, "cuIpcOpenMemHandle_v2", &cuIpcOpenMemHandle_);
  resolve(lib_, "cuIpcCloseMemHandle", &cuIpcCloseMemHandle_);
  resolve(lib_, "cuStreamCreate", &cuStreamCreate_);
  resolve(lib_, "cuStreamCreateWithPriority", &cuStreamCreateWithPriority_);
  resolve(lib_, "cuCtxGetStreamPriorityRange", &cuCtxGetStreamPriorityRange_);
  resolve(lib_, "cuStreamDestroy_v2", &cuStreamDestroy_);
  resolve(lib_, "cuStreamSynchronize", &cuStreamSynchronize_);
  resolve(lib_, "cuMemcpyAsync", &cuMemcpyAsync_);
  resolve(lib_, "cuEventSynchronize", &cuEventSynchronize_);
  resolve(lib_, "cuEventCreate", &cuEventCreate_);
  resolve(lib_, "cuEventDestroy_v2", &cuEventDestroy_);
  resolve(lib_, "cuEventRecord", &cuEventRecord_);
  resolve(lib_, "cuStreamWaitEvent", &cuStreamWaitEvent_);
  cuMemcpyBatchAsync_v2_ =
      reinterpret_cast<decltype(cuMemcpyBatchAsync_v2_)>(dlsym(lib_, "cuMemcpyBatchAsync_v2"));
  if (cuMemcpyBatchAsync_v2_ == nullptr) {
    cuMemcpyBatchAsync_v1_ =
        reinterpret_cast<decltype(cuMemcpyBatchAsync_v1_)>(dlsym(lib_, "cuMemcpyBatchAsync"));
  }
  Error e = check(cuInit_(0), "cuInit");
  if (!e.ok()) throw TransferError("the cuda_ipc backend needs a CUDA GPU: " + e.text);
}

Error Driver::check(int result, const char* what) {
  if (result == kSuccess) return {};
  const char* text = nullptr;
  if (cuGetErrorString_(result, &text) != kSuccess || text == nullptr) text = "unknown error";
  return {std::string(what) + " failed: " + text + " (CUresult " + std::to_string(result) + ")"};
}

Error Driver::make_current(int device) {
  CUcontext ctx = nullptr;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = contexts_.find(device);
    if (it != contexts_.end()) {
      ctx = it->second;
    } else {
      int dev = 0;
      Error e = check(cuDeviceGet_(&dev, device), "cuDeviceGet");
      if (e.ok()) e = check(cuDevicePrimaryCtxRetain_(&ctx, dev), "cuDevicePrimaryCtxRetain");
      if (!e.ok()) return e;
      contexts_[device] = ctx;
    }
  }
  return check(cuCtxSetCurrent_(ctx), "cuCtxSetCurrent");
}

Error Driver::device_of(CUdeviceptr ptr, int* device) {
  Error e = check(cuPointerGetAttribute_(device, kPointerAttributeDeviceOrdinal, ptr),
                  "cuPointerGetAttribute(DEVICE_ORDINAL)");
  if (!e.ok()) e.text += ": the address is not CUDA device memory";
  return e;
}

Error Driver::address_range(int device, CUdeviceptr ptr, CUdeviceptr* lo, CUdeviceptr* hi) {
  Error e = make_current(device);
  size_t size = 0;
  CUdeviceptr base = 0;
  if (e.ok()) e = check(cuMemGetAddressRange_(&base, &size, ptr), "cuMemGetAddressRange");
  if (e.ok()) {
    *lo = base;
    *hi = base + size;
  }
  return e;
}

Error Driver::export_allocation(CUdeviceptr ptr, IpcHandle* handle, CUdeviceptr* base,
                                uint64_t* nbytes) {
  int device = 0;
  Error e = device_of(ptr, &device);
  if (e.ok()) e = make_current(device);
  uint64_t buffer_id = 0;  // unique per allocation for the process's lifetime: a safe cache key
  if (e.ok()) {
    e = check(cuPointerGetAttribute_(&buffer_id, kPointerAttributeBufferId, ptr),
              "cuPointerGetAttribute(BUFFER_ID)");
  }
  if (e.ok()) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = exported_.find(buffer_id);
    if (it != exported_.end()) {
      *handle = it->second.handle;
      *base = it->second.base;
      *nbytes = it->second.nbytes;
      return e;
    }
  }
  size_t size = 0;
  if (e.ok()) e = check(cuMemGetAddressRange_(base, &size, ptr), "cuMemGetAddressRange");
  if (e.ok()) {
    e = check(cuIpcGetMemHandle_(handle, *base), "cuIpcGetMemHandle");
    if (!e.ok()) {
      e.text +=
          ": this memory cannot be shared with another process (imported from another process, "
          "or virtual memory such as PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)";
    }
  }
  *nbytes = size;
  if (e.ok()) {
    std::lock_guard<std::mutex> lk(mu_);
    if (exported_.size() >= 4096) exported_.clear();  // bound: allocations come and go
    exported_[buffer_id] = {*handle, *base, size};
  }
  return e;
}

Error Driver::open_handle(int device, const IpcHandle& handle, CUdeviceptr* ptr, uint64_t* nbytes) {
  Error e = make_current(device);
  if (e.ok()) {
    e = check(cuIpcOpenMemHandle_(ptr, handle, kIpcLazyEnablePeerAccess), "cuIpcOpenMemHandle");
  }
  CUdeviceptr base = 0;
  size_t size = 0;
  if (e.ok()) {
    e = check(cuMemGetAddressRange_(&base, &size, *ptr), "cuMemGetAddressRange");
    if (!e.ok()) cuIpcCloseMemHandle_(*ptr);  // do not keep a mapping nobody will use
  }
  *nbytes = size;
  return e;
}

Error Driver::close_handle(int device, CUdeviceptr ptr) {
  Error e = make_current(device);
  return e.ok() ? check(cuIpcCloseMemHandle_(ptr), "cuIpcCloseMemHandle") : e;
}

Error Driver::create_priority_stream(int device, CUstream* stream) {
  Error e = make_current(device);
  int least = 0, greatest = 0;
  if (e.ok()) {
    e = check(cuCtxGetStreamPriorityRange_(&least, &greatest), "cuCtxGetStreamPriorityRange");
  }
  return e.ok() ? check(cuStreamCreateWithPriority_(stream, kStreamNonBlocking, greatest),
                        "cuStreamCreateWithPriority")
                : e;
}

Error Driver::destroy_stream(int device, CUstream stream) {
  Error e = make_current(device);
  return e.ok() ? check(cuStreamDestroy_(stream), "cuStreamDestroy") : e;
}

Error Driver::copy_async(int device, const std::vector<CUdeviceptr>& dsts,
                         const std::vector<CUdeviceptr>& srcs, const std::vector<size_t>& sizes,
                         CUstream stream) {
  Error e = make_current(device);
  if (!e.ok() || dsts.empty()) return e;
  if (cuMemcpyBatchAsync_v2_ != nullptr || cuMemcpyBatchAsync_v1_ != nullptr) {
    // CUmemcpyAttributes: source accessed in stream order, no location hints, no flags.
    struct {
      int src_access_order = 1;  // CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
      int src_hint[2] = {0, 0};
      int dst_hint[2] = {0, 0};
      unsigned flags = 0;
    } attrs;
    static_assert(sizeof(attrs) == 24, "CUmemcpyAttributes is 24 bytes");
    size_t first = 0, fail_idx = 0;
    auto d = const_cast<CUdeviceptr*>(dsts.data());
    auto s = const_cast<CUdeviceptr*>(srcs.data());
    auto n = const_cast<size_t*>(sizes.data());
    int result =
        cuMemcpyBatchAsync_v2_ != nullptr
            ? cuMemcpyBatchAsync_v2_(d, s, n, dsts.size(), &attrs, &first, 1, stream)
            : cuMemcpyBatchAsync_v1_(d, s, n, dsts.size(), &attrs, &first, 1, &fail_idx, stream);
    return check(result, "cuMemcpyBatchAsync");
  }
  for (size_t i = 0; i < dsts.size() && e.ok(); ++i) {
    e = check(cuMemcpyAsync_(dsts[i], srcs[i], sizes[i], stream), "cuMemcpyAsync");
  }
  return e;
}

Error Driver::sync_stream(int device, CUstream stream) {
  Error e = make_current(device);
  return e.ok() ? check(cuStreamSynchronize_(stream), "cuStreamSynchronize") : e;
}

Error Driver::chain_event(int device, CUevent event, CUevent* own) {
  Error e = make_current(device);
  CUstream stream = nullptr;
  if (e.ok()) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = event_streams_.find(device);
    if (it != event_streams_.end()) {
      stream = it->second;
    } else {
      e = check(cuStreamCreate_(&stream, kStreamNonBlocking), "cuStreamCreate");
      if (e.ok()) event_streams_[device] = stream;
    }
  }
  *own = nullptr;
  if (e.ok()) {
    // No CU_EVENT_BLOCKING_SYNC: its wake-up cost ~5 ms of TTFT on a 2,048-token prompt (H100,
    // bench_disagg_ttft.py direct-whole 69.3 -> 64.7 ms without it); the waiting writer thread
    // spins on a core instead.
    e = check(cuEventCreate_(own, kEventDisableTiming), "cuEventCreate");
  }
  if (e.ok()) e = check(cuStreamWaitEvent_(stream, event, 0), "cuStreamWaitEvent");
  if (e.ok()) e = check(cuEventRecord_(*own, stream), "cuEventRecord");
  if (!e.ok() && *own != nullptr) {
    cuEventDestroy_(*own);
    *own = nullptr;
  }
  return e;
}

Error Driver::destroy_event(int device, CUevent event) {
  Error e = make_current(device);
  return e.ok() ? check(cuEventDestroy_(event), "cuEventDestroy") : e;
}

Error Driver::sync_event(int device, CUevent event) {
  Error e = make_current(device);
  return e.ok() ? check(cuEventSynchronize_(event), "cuEventSynchronize") : e;
}

}  // namespace pdserve::transfer::cuda
