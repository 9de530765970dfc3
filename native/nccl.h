// NCCL all-reduce for legato._native, with NCCL and the CUDA runtime loaded at run time.
//
// [Note: run-time loading] The module must build and import on machines without CUDA, so it
// links neither library: the first call that needs NCCL dlopens libnccl and libcudart
// (RTLD_LAZY | RTLD_LOCAL) and resolves the functions below with dlsym. A library or symbol that
// is missing becomes an NcclUnavailable error naming it and the fix; nothing crashes, and
// importing the module loads nothing. The libraries stay loaded for the life of the process.
//
// [Note: declared types] No CUDA or NCCL headers are needed to build: the few types used are
// declared here by hand, with the values of NVIDIA/nccl's src/nccl.h.in (ncclUniqueId is 128
// bytes; ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9; ncclSum = 0,
// ncclAvg = 4; ncclSuccess = 0, ncclInProgress = 7) and of the CUDA runtime (cudaSuccess = 0,
// cudaErrorNotReady = 600, cudaStreamNonBlocking = 1, cudaEventDisableTiming = 2). Handles are
// opaque pointers. These values are part of both libraries' stable ABIs.
//
// This header is free of Python; bindings.cc wraps Comm for Python and owns the GIL handling.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace legato {
namespace nccl {

// -- declared types (see [Note: declared types]) ----------------------------------------------
using ncclComm_t = struct ncclComm*;
using cudaStream_t = struct CUstream_st*;
using cudaEvent_t = struct CUevent_st*;
using ncclResult_t = int;
using cudaError_t = int;
constexpr int kUniqueIdBytes = 128;
struct ncclUniqueId {
  char internal[kUniqueIdBytes];
};
constexpr ncclResult_t kNcclSuccess = 0;
constexpr ncclResult_t kNcclInProgress = 7;
constexpr cudaError_t kCudaSuccess = 0;
constexpr cudaError_t kCudaErrorNotReady = 600;
constexpr unsigned kCudaStreamNonBlocking = 0x01;
constexpr unsigned kCudaEventDisableTiming = 0x02;
enum DataType : int { kFloat16 = 6, kFloat32 = 7, kFloat64 = 8, kBfloat16 = 9 };
enum RedOp : int { kSum = 0, kAvg = 4 };
// NCCL_VERSION(2, 10, 0): ncclAvg and ncclBfloat16 first appear in 2.10.
constexpr int kVersionAvgBf16 = 21000;

// Raised when NCCL or the CUDA runtime cannot be loaded; the message names what and the fix.
class NcclUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Raised when an NCCL or CUDA call fails.
class NcclError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The resolved functions of both libraries.
struct Api {
  ncclResult_t (*GetVersion)(int*);
  ncclResult_t (*GetUniqueId)(ncclUniqueId*);
  ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int);
  ncclResult_t (*AllReduce)(const void*, void*, size_t, int, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*CommDestroy)(ncclComm_t);
  ncclResult_t (*CommAbort)(ncclComm_t);
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t*);
  const char* (*GetErrorString)(ncclResult_t);

  cudaError_t (*SetDevice)(int);
  cudaError_t (*GetDevice)(int*);
  cudaError_t (*StreamCreateWithFlags)(cudaStream_t*, unsigned);
  cudaError_t (*StreamDestroy)(cudaStream_t);
  cudaError_t (*EventCreateWithFlags)(cudaEvent_t*, unsigned);
  cudaError_t (*EventRecord)(cudaEvent_t, cudaStream_t);
  cudaError_t (*EventQuery)(cudaEvent_t);
  cudaError_t (*EventDestroy)(cudaEvent_t);
  cudaError_t (*StreamWaitEvent)(cudaStream_t, cudaEvent_t, unsigned);
  const char* (*CudaGetErrorString)(cudaError_t);

  int version = 0;
  std::string nccl_path;    // the file that was loaded, as the dynamic linker reports it
  std::string cudart_path;
};

// What loading found; loading happens once per process, on the first call.
struct Status {
  bool available = false;
  std::string reason;  // empty when available
  int version = 0;
  std::string nccl_path;
  std::string cudart_path;
};

Status GetStatus();
// The loaded functions, or NcclUnavailable with the reason.
const Api& Require();

// "float32" -> kFloat32 etc.; std::invalid_argument listing the known names otherwise.
DataType ParseDataType(const std::string& name);
RedOp ParseOp(const std::string& name);

std::string NewUniqueId();

// Called exactly once per all-reduce: error is empty on success.
using Completion = std::function<void(const std::string& error)>;

// One NCCL communicator on one device, with its own non-blocking stream and a poller thread
// that reports completion. Construct, AllReduce, Close and Abort may block: call them without
// the GIL. Completions run on the poller thread, or on the thread calling Close/Abort.
class Comm {
 public:
  Comm(const std::string& unique_id, int rank, int world, int device);
  ~Comm();
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  // Enqueue an in-place all-reduce of `count` elements at device address `ptr`, on `stream`
  // (0: the comm's own stream), after the work queued so far on `wait_stream` (0: none).
  void AllReduce(uintptr_t ptr, size_t count, DataType dtype, RedOp op, uintptr_t stream,
                 uintptr_t wait_stream, Completion done);
  // Wait for every pending all-reduce to finish, then destroy the communicator.
  void Close();
  // Abort the communicator now; pending all-reduces complete with an error.
  void Abort();

  // True on the thread that runs completions, where Close and Abort cannot wait for it.
  bool OnPollerThread() const { return std::this_thread::get_id() == poller_.get_id(); }
  bool closed() const { return closed_.load(); }
  int rank() const { return rank_; }
  int world() const { return world_; }
  int device() const { return device_; }
  size_t pending() const;

 private:
  struct Pending {
    cudaEvent_t event;
    Completion done;
  };

  void PollLoop();
  void StopPoller();
  void RefuseOnPollerThread(const char* what) const;
  std::string CheckAsyncError();  // empty while the comm is healthy
  std::string Describe(const char* what) const;

  const Api& api_;
  const int rank_;
  const int world_;
  const int device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t wait_event_ = nullptr;  // orders the comm stream after a caller's stream
  std::mutex comm_mu_;  // guards comm_, stream_ and wait_event_ for enqueue, destroy and abort
  std::atomic<bool> closed_{false};

  mutable std::mutex mu_;  // guards pending_, free_events_, stop_, failed_
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;  // completed events, reused by later all-reduces
  bool stop_ = false;
  std::string failed_;  // the first asynchronous error; later all-reduces are refused
  std::thread poller_;
};

}  // namespace nccl
}  // namespace legato
