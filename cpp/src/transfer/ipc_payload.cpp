// The CUDA-IPC payload: exporting the sender's allocations, mapping them at the receiver (shared,
// counted per reader) and the receiver-side copies. See ipc_payload.h.
#include "ipc_payload.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>

namespace pdserve::transfer::ipc {

uint64_t process_token() {
  static const uint64_t random = [] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }();
  // the pid keeps a fork()ed child apart from its parent; never 0
  return (random ^ (static_cast<uint64_t>(getpid()) << 1)) | 1;
}

std::string describe_sources(const std::vector<Piece>& pieces,
                             std::vector<IpcAllocation>* allocations,
                             std::vector<IpcSource>* sources) {
  cuda::Driver& driver = cuda::Driver::get();
  allocations->clear();
  sources->clear();
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [base, end) of each allocation
  for (const Piece& p : pieces) {
    size_t idx = 0;
    while (idx < ranges.size() &&
           !(p.local_addr >= ranges[idx].first && p.local_addr < ranges[idx].second)) {
      ++idx;
    }
    if (idx == ranges.size()) {
      IpcAllocation a;
      uint64_t nbytes = 0;
      cuda::Error e = driver.export_allocation(p.local_addr, &a.handle, &a.base, &nbytes);
      if (!e.ok())
        return "cannot export local memory at " + std::to_string(p.local_addr) + ": " + e.text;
      a.process_token = process_token();
      allocations->push_back(a);
      ranges.emplace_back(a.base, a.base + nbytes);
    }
    if (p.local_addr + p.nbytes > ranges[idx].second) {
      return "local piece of " + std::to_string(p.nbytes) +
             " B crosses the end of its GPU allocation";
    }
    sources->push_back({static_cast<uint32_t>(idx), 0, p.local_addr - ranges[idx].first});
  }
  return "";
}

std::string Mappings::acquire(uint64_t reader, int device, const IpcAllocation& allocation,
                              cuda::CUdeviceptr* ptr, uint64_t* nbytes) {
  std::string key(reinterpret_cast<const char*>(&device), sizeof(device));
  key.append(reinterpret_cast<const char*>(allocation.handle.bytes), cuda::kIpcHandleNbytes);
  std::lock_guard<std::mutex> lk(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    Entry entry{device, 0, 0, {}};
    cuda::Error e =
        cuda::Driver::get().open_handle(device, allocation.handle, &entry.ptr, &entry.nbytes);
    if (!e.ok()) return "cannot map the sender's GPU memory: " + e.text;
    it = entries_.emplace(key, entry).first;
  }
  it->second.readers.insert(reader);
  *ptr = it->second.ptr;
  *nbytes = it->second.nbytes;
  return "";
}

void Mappings::release_reader(uint64_t reader) {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto it = entries_.begin(); it != entries_.end();) {
    it->second.readers.erase(reader);
    if (it->second.readers.empty()) {
      cuda::Driver::get().close_handle(it->second.device, it->second.ptr);  // best effort
      it = entries_.erase(it);
    } else {
      ++it;
    }
  }
}

Copier::~Copier() {
  if (!used_driver_) return;  // never copied: the driver may not even be loaded
  for (auto& [device, stream] : streams_) cuda::Driver::get().destroy_stream(device, stream);
  mappings_->release_reader(reader_id_);
}

std::string Copier::copy(const std::vector<IpcAllocation>& allocations, const WirePiece* pieces,
                         const IpcSource* sources, size_t num_pieces) {
  cuda::Driver& driver = cuda::Driver::get();
  used_driver_ = true;
  struct Batch {
    std::vector<cuda::CUdeviceptr> dsts, srcs;
    std::vector<size_t> sizes;
  };
  std::map<int, Batch> batches;  // by destination device
  // Resolved once per message (driver calls cost microseconds; a message has up to 512 pieces):
  // the destination allocation last seen and each source allocation's local address and size.
  cuda::CUdeviceptr dst_lo = 0, dst_hi = 0;
  int device = -1;
  std::vector<std::pair<cuda::CUdeviceptr, uint64_t>> resolved(allocations.size(), {0, 0});
  for (size_t i = 0; i < num_pieces; ++i) {
    const WirePiece& p = pieces[i];
    const IpcSource& s = sources[i];
    if (s.allocation_idx >= allocations.size()) return "protocol error: bad allocation index";
    if (!(p.remote_addr >= dst_lo && p.remote_addr < dst_hi)) {
      cuda::Error e = driver.device_of(p.remote_addr, &device);
      if (e.ok()) e = driver.address_range(device, p.remote_addr, &dst_lo, &dst_hi);
      if (!e.ok()) return "destination " + std::to_string(p.remote_addr) + ": " + e.text;
    }
    const IpcAllocation& a = allocations[s.allocation_idx];
    auto& [base, nbytes] = resolved[s.allocation_idx];
    if (base == 0) {
      std::string error;
      if (a.process_token == process_token()) {
        // Our own memory (a handle cannot be opened in its exporting process): the wire's base must
        // still name the start of one of our allocations; never trust it further.
        cuda::CUdeviceptr lo = 0, hi = 0;
        cuda::Error e = driver.address_range(device, a.base, &lo, &hi);
        if (!e.ok() || lo != a.base) {
          return "source allocation " + std::to_string(a.base) + " is not an allocation here";
        }
        base = lo;
        nbytes = hi - lo;
      } else {
        error = mappings_->acquire(reader_id_, device, a, &base, &nbytes);
      }
      if (!error.empty()) return error;
    }
    if (s.offset > nbytes || p.nbytes > nbytes - s.offset) {
      return "source range outside the sender's allocation of " + std::to_string(nbytes) + " B";
    }
    Batch& b = batches[device];
    b.dsts.push_back(p.remote_addr);
    b.srcs.push_back(base + s.offset);
    b.sizes.push_back(p.nbytes);
  }
  std::string error;
  std::vector<int> used;
  for (auto& [device, b] : batches) {
    auto st = streams_.find(device);
    if (st == streams_.end()) {
      cuda::CUstream stream = nullptr;
      cuda::Error e = driver.create_stream(device, &stream);
      if (!e.ok()) {
        error = e.text;
        break;
      }
      st = streams_.emplace(device, stream).first;
    }
    used.push_back(device);
    cuda::Error e;
    int code = 0;
    if (copy_fn_ != nullptr) {
      e = driver.use_device(device);
      static_assert(sizeof(cuda::CUdeviceptr) == sizeof(uint64_t) && sizeof(size_t) == 8);
      if (e.ok()) {
        code =
            copy_fn_(b.dsts.data(), b.srcs.data(),
                     reinterpret_cast<const uint64_t*>(b.sizes.data()), b.dsts.size(), st->second);
      }
      if (code != 0) copy_fn_ = nullptr;  // cannot launch here (old driver?): the driver's copies
    }
    if (e.ok() && (copy_fn_ == nullptr || code != 0)) {
      e = driver.copy_async(device, b.dsts, b.srcs, b.sizes, st->second);
    }
    if (!e.ok()) {
      error = e.text;
      break;
    }
  }
  for (int device : used) {  // wait even after an error: no copy may still run when we return
    cuda::Error e = driver.sync_stream(device, streams_.at(device));
    if (!e.ok() && error.empty()) error = e.text;
  }
  return error;
}

}  // namespace pdserve::transfer::ipc
