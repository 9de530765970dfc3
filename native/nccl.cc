// NCCL all-reduce with run-time loading; see [Note: run-time loading] in nccl.h.
#include "nccl.h"

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <utility>

namespace legato {
namespace nccl {
namespace {

constexpr const char* kNcclEnv = "LEGATO_NCCL_LIBRARY";
constexpr const char* kCudartEnv = "LEGATO_CUDART_LIBRARY";
const char* const kNcclNames[] = {"libnccl.so.2", "libnccl.so"};
const char* const kCudartNames[] = {"libcudart.so.12", "libcudart.so.13", "libcudart.so.11",
                                    "libcudart.so"};
constexpr const char* kNcclFix =
    "install NCCL 2.10 or newer (`pip install nvidia-nccl-cu12`, or the libnccl2 package) or "
    "set LEGATO_NCCL_LIBRARY to the path of libnccl.so.2";
constexpr const char* kCudartFix =
    "install the CUDA runtime (`pip install nvidia-cuda-runtime-cu12`, or the CUDA toolkit) or "
    "set LEGATO_CUDART_LIBRARY to the path of libcudart.so";

std::string DlError() {
  const char* err = dlerror();
  return err != nullptr ? err : "unknown dlopen error";
}

// Open the library named by `env_var` if set (and only that), else the first of `names` already
// in the process (torch may have loaded it), else the first that loads. Empty reason on success.
void* Open(const char* env_var, const char* const* names, size_t num_names, const char* what,
           const char* fix, std::string* reason) {
  const char* explicit_path = std::getenv(env_var);
  if (explicit_path != nullptr && *explicit_path != '\0') {
    void* handle = dlopen(explicit_path, RTLD_LAZY | RTLD_LOCAL);
    if (handle == nullptr) {
      *reason = std::string(env_var) + "=" + explicit_path + " could not be loaded (" +
                DlError() + "); set it to the path of an existing " + what +
                ", or unset it to search the library path";
    }
    return handle;
  }
  for (size_t i = 0; i < num_names; ++i) {
    if (void* handle = dlopen(names[i], RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD)) return handle;
  }
  std::string errors;
  for (size_t i = 0; i < num_names; ++i) {
    if (void* handle = dlopen(names[i], RTLD_LAZY | RTLD_LOCAL)) return handle;
    errors += (errors.empty() ? "" : "; ") + DlError();
  }
  std::string tried;
  for (size_t i = 0; i < num_names; ++i) tried += (i ? ", " : "") + std::string(names[i]);
  *reason = std::string("could not load ") + what + " (tried " + tried + ": " + errors + "); " +
            fix;
  return nullptr;
}

std::string PathOf(void* symbol) {
  Dl_info info;
  if (symbol != nullptr && dladdr(symbol, &info) != 0 && info.dli_fname != nullptr) {
    return info.dli_fname;
  }
  return "";
}

template <typename Fn>
bool Resolve(void* handle, const char* name, const char* library, const char* fix, Fn* out,
             std::string* reason) {
  dlerror();
  void* symbol = dlsym(handle, name);
  if (symbol == nullptr) {
    *reason = std::string(name) + " is missing from " + library + " (" + DlError() +
              "); it is too old or not the real library: " + fix;
    return false;
  }
  *out = reinterpret_cast<Fn>(symbol);
  return true;
}

struct Loaded {
  Api api{};
  Status status;
};

Loaded Load() {
  Loaded l;
  Status& s = l.status;
  Api& a = l.api;
  void* nccl = Open(kNcclEnv, kNcclNames, std::size(kNcclNames), "libnccl.so.2", kNcclFix,
                    &s.reason);
  if (nccl == nullptr) return l;
  void* cudart = Open(kCudartEnv, kCudartNames, std::size(kCudartNames), "libcudart.so",
                      kCudartFix, &s.reason);
  if (cudart == nullptr) return l;
  // Both handles stay open for the life of the process (never dlclose'd).
#define LEGATO_RESOLVE(lib, path, fix, field, name) \
  if (!Resolve(lib, name, path, fix, &a.field, &s.reason)) return l
  LEGATO_RESOLVE(nccl, "libnccl", kNcclFix, GetVersion, "ncclGetVersion");
  s.nccl_path = a.nccl_path = PathOf(reinterpret_cast<void*>(a.GetVersion));
  const char* np = a.nccl_path.c_str();
  LEGATO_RESOLVE(nccl, np, kNcclFix, GetUniqueId, "ncclGetUniqueId");
  LEGATO_RESOLVE(nccl, np, kNcclFix, CommInitRank, "ncclCommInitRank");
  LEGATO_RESOLVE(nccl, np, kNcclFix, AllReduce, "ncclAllReduce");
  LEGATO_RESOLVE(nccl, np, kNcclFix, CommDestroy, "ncclCommDestroy");
  LEGATO_RESOLVE(nccl, np, kNcclFix, CommAbort, "ncclCommAbort");
  LEGATO_RESOLVE(nccl, np, kNcclFix, CommGetAsyncError, "ncclCommGetAsyncError");
  LEGATO_RESOLVE(nccl, np, kNcclFix, GetErrorString, "ncclGetErrorString");
  LEGATO_RESOLVE(cudart, "libcudart", kCudartFix, SetDevice, "cudaSetDevice");
  s.cudart_path = a.cudart_path = PathOf(reinterpret_cast<void*>(a.SetDevice));
  const char* cp = a.cudart_path.c_str();
  LEGATO_RESOLVE(cudart, cp, kCudartFix, GetDevice, "cudaGetDevice");
  LEGATO_RESOLVE(cudart, cp, kCudartFix, StreamCreateWithFlags, "cudaStreamCreateWithFlags");
  LEGATO_RESOLVE(cudart, cp, kCudartFix, StreamDestroy, "cudaStreamDestroy");
  LEGATO_RESOLVE(cudart, cp, kCudartFix, EventCreateWithFlags, "cudaEventCreateWithFlags");
  LEGATO_RESOLVE(cudart, cp, kCudartFix, EventRecord, "cudaEventRecord");
  LEGATO_RESOLVE(cudart, cp, kCudartFix, EventQuery, "cudaEventQuery");
  LEGATO_RESOLVE(cudart, cp, kCudartFix, EventDestroy, "cudaEventDestroy");
  LEGATO_RESOLVE(cudart, cp, kCudartFix, StreamWaitEvent, "cudaStreamWaitEvent");
  LEGATO_RESOLVE(cudart, cp, kCudartFix, CudaGetErrorString, "cudaGetErrorString");
#undef LEGATO_RESOLVE
  const ncclResult_t rc = a.GetVersion(&a.version);
  if (rc != kNcclSuccess) {
    s.reason = "ncclGetVersion failed in " + a.nccl_path + " (ncclResult " + std::to_string(rc) +
               "); " + kNcclFix;
    return l;
  }
  s.version = a.version;
  s.available = true;
  return l;
}

const Loaded& Get() {
  static const Loaded loaded = Load();  // thread-safe, once per process
  return loaded;
}

std::string NcclText(const Api& api, ncclResult_t rc) {
  const char* text = api.GetErrorString(rc);
  return std::string(text != nullptr ? text : "unknown NCCL error") + " (ncclResult " +
         std::to_string(rc) + ")";
}

std::string CudaText(const Api& api, cudaError_t rc) {
  const char* text = api.CudaGetErrorString(rc);
  return std::string(text != nullptr ? text : "unknown CUDA error") + " (cudaError " +
         std::to_string(rc) + ")";
}

void NcclCheck(const Api& api, ncclResult_t rc, const std::string& call) {
  if (rc == kNcclSuccess) return;
  throw NcclError(call + " failed: " + NcclText(api, rc) +
                  "; run with NCCL_DEBUG=WARN for NCCL's own explanation");
}

void CudaCheck(const Api& api, cudaError_t rc, const std::string& call) {
  if (rc == kCudaSuccess) return;
  throw NcclError(call + " failed: " + CudaText(api, rc));
}

// Makes `device` current on this thread for the guard's lifetime.
class DeviceGuard {
 public:
  DeviceGuard(const Api& api, int device) : api_(api) {
    if (api_.GetDevice(&previous_) != kCudaSuccess) previous_ = -1;
    CudaCheck(api_, api_.SetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
  }
  ~DeviceGuard() {
    if (previous_ >= 0) api_.SetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  const Api& api_;
  int previous_ = -1;
};

}  // namespace

Status GetStatus() { return Get().status; }

const Api& Require() {
  const Loaded& loaded = Get();
  if (!loaded.status.available) {
    throw NcclUnavailable("NCCL is not available: " + loaded.status.reason);
  }
  return loaded.api;
}

DataType ParseDataType(const std::string& name) {
  if (name == "float32") return kFloat32;
  if (name == "float16") return kFloat16;
  if (name == "bfloat16") return kBfloat16;
  if (name == "float64") return kFloat64;
  throw std::invalid_argument("dtype='" + name +
                              "' is not supported; pass one of float32, float16, bfloat16, "
                              "float64");
}

RedOp ParseOp(const std::string& name) {
  if (name == "sum") return kSum;
  if (name == "avg") return kAvg;
  throw std::invalid_argument("op='" + name + "' is not supported; pass 'sum' or 'avg'");
}

std::string NewUniqueId() {
  const Api& api = Require();
  ncclUniqueId id;
  NcclCheck(api, api.GetUniqueId(&id), "ncclGetUniqueId");
  return std::string(id.internal, kUniqueIdBytes);
}

// -- Comm ------------------------------------------------------------------------------------

Comm::Comm(const std::string& unique_id, int rank, int world, int device)
    : api_(Require()), rank_(rank), world_(world), device_(device) {
  if (unique_id.size() != static_cast<size_t>(kUniqueIdBytes)) {
    throw std::invalid_argument("unique_id has " + std::to_string(unique_id.size()) +
                                " bytes; pass the 128 bytes of nccl_unique_id()");
  }
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), kUniqueIdBytes);
  DeviceGuard guard(api_, device_);
  NcclCheck(api_, api_.CommInitRank(&comm_, world_, id, rank_),
            Describe("ncclCommInitRank"));
  cudaError_t rc = api_.StreamCreateWithFlags(&stream_, kCudaStreamNonBlocking);
  if (rc == kCudaSuccess) rc = api_.EventCreateWithFlags(&wait_event_, kCudaEventDisableTiming);
  if (rc != kCudaSuccess) {
    if (stream_ != nullptr) api_.StreamDestroy(stream_);
    api_.CommDestroy(comm_);
    CudaCheck(api_, rc, Describe("creating the communicator's stream"));
  }
  poller_ = std::thread([this] { PollLoop(); });
}

Comm::~Comm() {
  if (!closed_.load() && !OnPollerThread()) {
    try {
      if (pending() > 0) {
        Abort();
      } else {
        Close();
      }
    } catch (...) {
      // A destructor cannot report; close() and abort() raise the same errors when called.
    }
  }
  if (!poller_.joinable()) return;
  if (OnPollerThread()) {
    poller_.detach();  // destroyed from its own callback; bindings.cc avoids this
  } else {
    StopPoller();
  }
}

std::string Comm::Describe(const char* what) const {
  return std::string(what) + " (rank " + std::to_string(rank_) + " of " +
         std::to_string(world_) + ", device " + std::to_string(device_) + ")";
}

size_t Comm::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_.size();
}

void Comm::AllReduce(uintptr_t ptr, size_t count, DataType dtype, RedOp op, uintptr_t stream,
                     uintptr_t wait_stream, Completion done) {
  if ((dtype == kBfloat16 || op == kAvg) && api_.version < kVersionAvgBf16) {
    throw NcclError("NCCL " + std::to_string(api_.version) + " (" + api_.nccl_path +
                    ") has no bfloat16 or avg; " + kNcclFix);
  }
  std::lock_guard<std::mutex> comm_lock(comm_mu_);
  if (closed_.load() || comm_ == nullptr) {
    throw NcclError(Describe("the communicator") + " is closed; create a new NcclComm");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_.empty()) {
      throw NcclError(failed_ + "; call abort() and create a new NcclComm");
    }
  }
  DeviceGuard guard(api_, device_);
  cudaStream_t target = stream != 0 ? reinterpret_cast<cudaStream_t>(stream) : stream_;
  if (wait_stream != 0 && wait_stream != reinterpret_cast<uintptr_t>(target)) {
    // The wait captures the event's state now, so one event serves every call.
    CudaCheck(api_, api_.EventRecord(wait_event_, reinterpret_cast<cudaStream_t>(wait_stream)),
              "cudaEventRecord on wait_stream");
    CudaCheck(api_, api_.StreamWaitEvent(target, wait_event_, 0), "cudaStreamWaitEvent");
  }
  cudaEvent_t event = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_events_.empty()) {
      event = free_events_.back();
      free_events_.pop_back();
    }
  }
  if (event == nullptr) {
    CudaCheck(api_, api_.EventCreateWithFlags(&event, kCudaEventDisableTiming),
              "cudaEventCreateWithFlags");
  }
  void* buffer = reinterpret_cast<void*>(ptr);
  ncclResult_t rc = api_.AllReduce(buffer, buffer, count, dtype, op, comm_, target);
  cudaError_t cuda_rc = rc == kNcclSuccess ? api_.EventRecord(event, target) : kCudaSuccess;
  if (rc != kNcclSuccess || cuda_rc != kCudaSuccess) {
    api_.EventDestroy(event);
    NcclCheck(api_, rc, Describe("ncclAllReduce"));
    CudaCheck(api_, cuda_rc, "cudaEventRecord after ncclAllReduce");
  }
  std::lock_guard<std::mutex> lock(mu_);
  pending_.push_back(Pending{event, std::move(done)});
  cv_.notify_one();
}

std::string Comm::CheckAsyncError() {
  std::unique_lock<std::mutex> lock(comm_mu_, std::try_to_lock);
  if (!lock.owns_lock() || comm_ == nullptr) return "";  // busy: check on the next round
  ncclResult_t async = kNcclSuccess;
  const ncclResult_t rc = api_.CommGetAsyncError(comm_, &async);
  if (rc != kNcclSuccess) {
    return Describe("ncclCommGetAsyncError") + " failed: " + NcclText(api_, rc);
  }
  if (async == kNcclSuccess || async == kNcclInProgress) return "";
  return "NCCL reported an asynchronous error on " + Describe("the communicator") + ": " +
         NcclText(api_, async) + "; a peer may have failed or timed out";
}

void Comm::PollLoop() {
  api_.SetDevice(device_);  // event queries from this thread use the comm's device
  std::vector<cudaEvent_t> events;
  std::vector<std::pair<cudaEvent_t, std::string>> finished;
  while (true) {
    std::string failed;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !pending_.empty(); });
      if (stop_) return;  // Close drained everything first; Abort fails what is left
      events.clear();
      for (const Pending& p : pending_) events.push_back(p.event);
      failed = failed_;
    }
    finished.clear();
    if (failed.empty()) failed = CheckAsyncError();
    for (cudaEvent_t event : events) {
      if (!failed.empty()) {
        finished.emplace_back(event, failed);
        continue;
      }
      const cudaError_t rc = api_.EventQuery(event);
      if (rc == kCudaSuccess) {
        finished.emplace_back(event, std::string());
      } else if (rc != kCudaErrorNotReady) {
        finished.emplace_back(event, Describe("cudaEventQuery") + " failed: " +
                                         CudaText(api_, rc));
      }
    }
    if (finished.empty()) {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
      continue;
    }
    std::vector<std::pair<Completion, std::string>> calls;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_.empty() && !failed.empty()) failed_ = failed;
      for (auto& [event, error] : finished) {
        for (auto it = pending_.begin(); it != pending_.end(); ++it) {
          if (it->event != event) continue;
          calls.emplace_back(std::move(it->done), std::move(error));
          free_events_.push_back(event);
          pending_.erase(it);
          break;
        }
      }
    }
    for (auto& [done, error] : calls) {
      try {
        done(error);
      } catch (...) {
        // A completion must not stop the poller; bindings.cc reports Python errors itself.
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (pending_.empty()) idle_cv_.notify_all();
  }
}

void Comm::StopPoller() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (poller_.joinable()) poller_.join();
}

void Comm::RefuseOnPollerThread(const char* what) const {
  if (!OnPollerThread()) return;
  throw NcclError(std::string(what) + "() was called from an all_reduce callback, on the thread "
                  "that runs the callbacks, so it would wait for itself; call it from another "
                  "thread");
}

void Comm::Close() {
  RefuseOnPollerThread("close");
  if (closed_.exchange(true)) return;
  { std::lock_guard<std::mutex> wait_for_enqueue(comm_mu_); }  // later calls see closed_
  {
    std::unique_lock<std::mutex> lock(mu_);
    idle_cv_.wait(lock, [this] { return pending_.empty(); });
  }
  StopPoller();
  std::lock_guard<std::mutex> comm_lock(comm_mu_);
  ncclResult_t rc = kNcclSuccess;
  {
    DeviceGuard guard(api_, device_);
    rc = api_.CommDestroy(comm_);
    comm_ = nullptr;
    api_.StreamDestroy(stream_);
    api_.EventDestroy(wait_event_);
    for (cudaEvent_t event : free_events_) api_.EventDestroy(event);
    free_events_.clear();
  }
  NcclCheck(api_, rc, Describe("ncclCommDestroy"));
}

void Comm::Abort() {
  RefuseOnPollerThread("abort");
  if (closed_.exchange(true)) return;
  ncclResult_t rc = kNcclSuccess;
  {
    std::lock_guard<std::mutex> comm_lock(comm_mu_);
    rc = api_.CommAbort(comm_);
    comm_ = nullptr;
  }
  StopPoller();
  std::vector<Pending> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(pending_);
  }
  {
    DeviceGuard guard(api_, device_);
    // Destroying a stream or event with work still queued is allowed: CUDA frees them later.
    api_.StreamDestroy(stream_);
    api_.EventDestroy(wait_event_);
    for (cudaEvent_t event : free_events_) api_.EventDestroy(event);
    free_events_.clear();
    for (Pending& p : left) api_.EventDestroy(p.event);
  }
  const std::string error = Describe("the communicator") + " was aborted before this " +
                            "all-reduce finished";
  for (Pending& p : left) {
    try {
      p.done(error);
    } catch (...) {
    }
  }
  NcclCheck(api_, rc, Describe("ncclCommAbort"));
}

}  // namespace nccl
}  // namespace legato
