// legato's communication priority queue: tasks ordered by priority (lower is more urgent, FIFO
// among equals), admitted under a credit window in bytes, handed out either by pull (pop) or to
// an executor on a dispatcher thread (see bindings.cc). This header is free of Python; the
// dispatcher thread and the GIL handling live in bindings.cc.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <limits>
#include <algorithm>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace legato {

struct Task {
  int64_t id;
  int64_t priority;
  int64_t bytes;
};

// How a task is admitted against the credit window.
enum class Admission {
  // Start the most urgent task while any credit is left (ByteScheduler). Bytes in flight may
  // exceed the credit by less than the largest task.
  kOvershoot,
  // Start the most urgent task only if it fits in the credit left (BytePS). A task larger than
  // the whole credit is refused at post time, since it could never start.
  kFit,
};

Admission ParseAdmission(const std::string& mode);
const char* AdmissionName(Admission mode);

struct Stats {
  int64_t queued = 0;
  int64_t in_flight = 0;
  int64_t bytes_in_flight = 0;
  int64_t peak_bytes_in_flight = 0;
  int64_t posted = 0;
  int64_t dispatched = 0;
  int64_t completed = 0;
  int64_t credit_bytes = 0;
};

// Raised when a blocking wait runs out of time; bound to Python's TimeoutError.
class QueueTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Raised by post() after close(); bound to Python's RuntimeError.
class QueueClosed : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class PriorityQueue {
 public:
  static constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();

  // credit_bytes > 0 (kUnlimited for no window). Throws std::invalid_argument otherwise.
  PriorityQueue(int64_t credit_bytes, Admission mode);

  PriorityQueue(const PriorityQueue&) = delete;
  PriorityQueue& operator=(const PriorityQueue&) = delete;

  // Queue a task. Throws std::invalid_argument for a negative id or size, an id already queued
  // or in flight, or (fit mode) a task larger than the credit; QueueClosed after close().
  void Post(int64_t id, int64_t priority, int64_t bytes);

  // Take the most urgent task if the credit window admits it now, marking it in flight.
  std::optional<Task> TryPop();

  // Take up to max_tasks admissible tasks at once (same order as repeated TryPop).
  std::vector<Task> TryPopMany(size_t max_tasks);

  // Wait until a task is admissible (then take it), or the queue is closed and empty (returns
  // nullopt), or timeout_s runs out (negative: wait forever; returns nullopt). Also wakes and
  // returns nullopt when Interrupt() is called.
  std::optional<Task> Pop(double timeout_s);

  // Like Pop, but takes every admissible task (up to max_tasks) once one is admissible.
  std::vector<Task> PopMany(size_t max_tasks, double timeout_s);

  // Report a task done: its credit returns to the window. Throws std::invalid_argument for an id
  // that is not in flight (never posted, still queued, or completed already).
  void Complete(int64_t id);

  // Put tasks taken by a pop but never started back at the front of their priority class, in
  // the given order, returning their credit. Allowed after close(), so that nothing is lost.
  void Return(const std::vector<Task>& tasks);

  // Change the credit window; applies to the next admission. Same validation as the constructor.
  // In fit mode, fails if a queued task would no longer fit.
  void SetCredit(int64_t credit_bytes);

  // No more posts; queued tasks can still be popped.
  void Close();

  // Remove and return every queued (not yet started) task, in dispatch order.
  std::vector<Task> TakeQueued();

  // Wait until nothing is queued or in flight (negative timeout: forever), or Interrupt().
  // Returns true when idle, false when interrupted first; throws QueueTimeout.
  bool WaitIdle(double timeout_s);

  // Wake every waiter in Pop/PopMany/WaitIdle so it returns (a dispatcher thread stops).
  void Interrupt();
  bool interrupted() const;

  Stats GetStats() const;
  Admission mode() const { return mode_; }
  bool closed() const;

 private:
  // A queued task with its arrival sequence: FIFO among equal priorities.
  struct Entry {
    int64_t priority;
    int64_t seq;
    Task task;
  };
  // std::push_heap builds a max-heap; "a < b" here means b is more urgent than a.
  struct LessUrgent {
    bool operator()(const Entry& a, const Entry& b) const {
      return a.priority != b.priority ? a.priority > b.priority : a.seq > b.seq;
    }
  };
  // One slot per live task (queued or in flight), so that duplicate ids, unknown completions
  // and their error messages cost one hash lookup.
  struct Slot {
    bool in_flight;
    int64_t bytes;
  };

  bool AdmissibleLocked() const;
  Task TakeHeadLocked();
  void PushLocked(const Task& task, int64_t seq);
  bool WaitAdmissibleLocked(std::unique_lock<std::mutex>& lock, double timeout_s);
  void ValidateCreditLocked(int64_t credit_bytes) const;

  const Admission mode_;
  int64_t credit_bytes_;
  mutable std::mutex mu_;
  std::condition_variable ready_cv_;  // a task may have become admissible, or closed/interrupt
  std::condition_variable idle_cv_;   // queued + in flight may have dropped to zero
  std::vector<Entry> heap_;           // binary heap, most urgent at heap_.front()
  std::unordered_map<int64_t, Slot> slots_;
  int64_t next_seq_ = 0;
  int64_t returned_seq_ = 0;  // returned tasks count down, ahead of every arrival
  bool closed_ = false;
  bool interrupted_ = false;
  Stats stats_;
};

}  // namespace legato
