// The CUDA-IPC payload: exporting the receiver's allocations, mapping them at the sender (shared,
// counted per writer) and the sender-side copies. See ipc_payload.h.
#include "ipc_payload.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

namespace pdserve::transfer::ipc {

uint64_t process_token() {
  static const uint64_t random = [] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }();
  // the pid keeps a fork()ed child apart from its parent; never 0
  return (random ^ (static_cast<uint64_t>(getpid()) << 1)) | 1;
}

namespace {

uint64_t pid_namespace_of(const std::string& path) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
}

// 1: pid names no process, or one that has ended and awaits its parent (a zombie: its files, GPU
// contexts among them, are closed); 0: it runs; -1: cannot tell.
int process_gone(int64_t pid) {
  if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return 1;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return -1;
  size_t paren = line.rfind(')');  // the state follows the command name, which may hold spaces
  if (paren == std::string::npos || paren + 2 >= line.size()) return -1;
  char state = line[paren + 2];
  return state == 'Z' || state == 'X' ? 1 : 0;
}

}  // namespace

IpcWriter this_writer() {
  static const uint64_t ns = pid_namespace_of("/proc/self/ns/pid");
  return {static_cast<int64_t>(getpid()), process_token(), ns};
}

std::string wait_writer_gone(const IpcWriter& writer, double timeout_s) {
  const IpcWriter me = this_writer();
  if (writer.process_token == me.process_token) return "the sender is this process";
  const auto timeout = std::chrono::duration<double>(timeout_s);
  const std::string who = "the sender (pid " + std::to_string(writer.pid) + ")";
  if (writer.pid <= 0 || writer.pid_namespace == 0 || writer.pid_namespace != me.pid_namespace) {
    std::this_thread::sleep_for(timeout);
    return who + " cannot be observed from here (another pid namespace); waited " +
           std::to_string(timeout_s) + " s";
  }
  auto deadline = std::chrono::steady_clock::now() + timeout;
  int gone = process_gone(writer.pid);
  while (gone != 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    gone = process_gone(writer.pid);
  }
  if (gone == 1) return who + " has ended";
  return who + (gone == 0 ? " still runs" : " cannot be observed") + " after " +
         std::to_string(timeout_s) + " s";
}

std::string describe_destinations(const WirePiece* pieces, size_t num_pieces,
                                  std::vector<IpcAllocation>* allocations,
                                  std::vector<IpcLocation>* locations) {
  cuda::Driver& driver = cuda::Driver::get();
  allocations->clear();
  locations->clear();
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [base, end) of each allocation
  for (size_t i = 0; i < num_pieces; ++i) {
    const WirePiece& p = pieces[i];
    size_t idx = 0;
    while (idx < ranges.size() &&
           !(p.remote_addr >= ranges[idx].first && p.remote_addr < ranges[idx].second)) {
      ++idx;
    }
    if (idx == ranges.size()) {
      IpcAllocation a;
      uint64_t nbytes = 0;
      cuda::Error e = driver.export_allocation(p.remote_addr, &a.handle, &a.base, &nbytes);
      if (!e.ok()) {
        return "cannot export the destination at " + std::to_string(p.remote_addr) + ": " + e.text;
      }
      a.process_token = process_token();
      allocations->push_back(a);
      ranges.emplace_back(a.base, a.base + nbytes);
    }
    if (p.remote_addr + p.nbytes > ranges[idx].second) {
      return "destination piece of " + std::to_string(p.nbytes) +
             " B crosses the end of its GPU allocation";
    }
    locations->push_back({static_cast<uint32_t>(idx), 0, p.remote_addr - ranges[idx].first});
  }
  return "";
}

std::string Mappings::acquire(uint64_t writer, int device, const IpcAllocation& allocation,
                              cuda::CUdeviceptr* ptr, uint64_t* nbytes) {
  std::string key(reinterpret_cast<const char*>(&device), sizeof(device));
  key.append(reinterpret_cast<const char*>(allocation.handle.bytes), cuda::kIpcHandleNbytes);
  std::lock_guard<std::mutex> lk(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    Entry entry{device, 0, 0, {}};
    cuda::Error e =
        cuda::Driver::get().open_handle(device, allocation.handle, &entry.ptr, &entry.nbytes);
    if (!e.ok()) return "cannot map the receiver's GPU memory: " + e.text;
    it = entries_.emplace(key, entry).first;
  }
  it->second.writers.insert(writer);
  *ptr = it->second.ptr;
  *nbytes = it->second.nbytes;
  return "";
}

void Mappings::release_writer(uint64_t writer) {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto it = entries_.begin(); it != entries_.end();) {
    it->second.writers.erase(writer);
    if (it->second.writers.empty()) {
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
  mappings_->release_writer(writer_id_);
}

std::string Copier::locate(const std::vector<Piece>& pieces, std::vector<int>* devices) {
  cuda::Driver& driver = cuda::Driver::get();
  used_driver_ = true;
  devices->clear();
  // Resolved once per allocation (driver calls cost microseconds; a message has up to 512 pieces).
  cuda::CUdeviceptr lo = 0, hi = 0;  // the allocation last seen
  int device = -1;
  for (const Piece& p : pieces) {
    if (!(p.local_addr >= lo && p.local_addr + p.nbytes <= hi)) {
      cuda::Error e = driver.device_of(p.local_addr, &device);
      if (e.ok()) e = driver.address_range(device, p.local_addr, &lo, &hi);
      if (!e.ok()) return "local memory at " + std::to_string(p.local_addr) + ": " + e.text;
      if (p.local_addr + p.nbytes > hi) {
        return "local piece of " + std::to_string(p.nbytes) +
               " B crosses the end of its GPU allocation";
      }
    }
    devices->push_back(device);
  }
  return "";
}

std::string Copier::copy(const std::vector<Piece>& pieces, const std::vector<int>& devices,
                         const std::vector<IpcAllocation>& allocations,
                         const IpcLocation* locations) {
  cuda::Driver& driver = cuda::Driver::get();
  used_driver_ = true;
  struct Batch {
    std::vector<cuda::CUdeviceptr> dsts, srcs;
    std::vector<size_t> sizes;
    std::vector<std::pair<cuda::CUdeviceptr, uint64_t>> resolved;  // per allocation, this device
  };
  std::map<int, Batch> batches;  // by source device: the copy runs there
  for (size_t i = 0; i < pieces.size(); ++i) {
    const Piece& p = pieces[i];
    const IpcLocation& loc = locations[i];
    if (loc.allocation_idx >= allocations.size()) return "protocol error: bad allocation index";
    const int device = devices[i];
    Batch& b = batches[device];
    if (b.resolved.empty()) b.resolved.assign(allocations.size(), {0, 0});
    const IpcAllocation& a = allocations[loc.allocation_idx];
    auto& [base, nbytes] = b.resolved[loc.allocation_idx];
    if (base == 0) {
      std::string error;
      if (a.process_token == process_token()) {
        // Our own memory (a handle cannot be opened in its exporting process): the wire's base must
        // still name the start of one of our allocations; never trust it further.
        cuda::CUdeviceptr lo = 0, hi = 0;
        int owner = -1;
        cuda::Error e = driver.device_of(a.base, &owner);
        if (e.ok()) e = driver.address_range(owner, a.base, &lo, &hi);
        if (!e.ok() || lo != a.base) {
          return "destination allocation " + std::to_string(a.base) + " is not an allocation here";
        }
        base = lo;
        nbytes = hi - lo;
      } else {
        error = mappings_->acquire(writer_id_, device, a, &base, &nbytes);
      }
      if (!error.empty()) return error;
    }
    if (loc.offset > nbytes || p.nbytes > nbytes - loc.offset) {
      return "destination range outside the receiver's allocation of " + std::to_string(nbytes) +
             " B";
    }
    b.dsts.push_back(base + loc.offset);
    b.srcs.push_back(p.local_addr);
    b.sizes.push_back(p.nbytes);
  }
  std::string error;
  std::vector<int> used;
  for (auto& [dev, b] : batches) {
    auto st = streams_.find(dev);
    if (st == streams_.end()) {
      cuda::CUstream stream = nullptr;
      cuda::Error e = driver.create_priority_stream(dev, &stream);
      if (!e.ok()) {
        error = e.text;
        break;
      }
      st = streams_.emplace(dev, stream).first;
    }
    used.push_back(dev);
    cuda::Error e;
    int code = 0;
    if (copy_fn_ != nullptr) {
      e = driver.use_device(dev);
      static_assert(sizeof(cuda::CUdeviceptr) == sizeof(uint64_t) && sizeof(size_t) == 8);
      if (e.ok()) {
        code =
            copy_fn_(b.dsts.data(), b.srcs.data(),
                     reinterpret_cast<const uint64_t*>(b.sizes.data()), b.dsts.size(), st->second);
      }
      if (code != 0) copy_fn_ = nullptr;  // cannot launch here (old driver?): the driver's copies
    }
    if (e.ok() && (copy_fn_ == nullptr || code != 0)) {
      e = driver.copy_async(dev, b.dsts, b.srcs, b.sizes, st->second);
    }
    if (!e.ok()) {
      error = e.text;
      break;
    }
  }
  for (int dev : used) {  // wait even after an error: no copy may still run when we return
    cuda::Error e = driver.sync_stream(dev, streams_.at(dev));
    if (!e.ok() && error.empty()) error = e.text;
  }
  return error;
}

}  // namespace pdserve::transfer::ipc
