#include "priority_queue.h"

#include <chrono>
#include <sstream>

namespace legato {

namespace {

std::string CreditText(int64_t credit_bytes) {
  return credit_bytes == PriorityQueue::kUnlimited ? std::string("unlimited")
                                                   : std::to_string(credit_bytes);
}

}  // namespace

Admission ParseAdmission(const std::string& mode) {
  if (mode == "overshoot") return Admission::kOvershoot;
  if (mode == "fit") return Admission::kFit;
  throw std::invalid_argument("mode='" + mode +
                              "' is unknown; pass mode='overshoot' (start while any credit is "
                              "left, as ByteScheduler) or mode='fit' (start only tasks that fit, "
                              "as BytePS)");
}

const char* AdmissionName(Admission mode) {
  return mode == Admission::kOvershoot ? "overshoot" : "fit";
}

PriorityQueue::PriorityQueue(int64_t credit_bytes, Admission mode)
    : mode_(mode), credit_bytes_(credit_bytes) {
  ValidateCreditLocked(credit_bytes);
  stats_.credit_bytes = credit_bytes;
}

void PriorityQueue::ValidateCreditLocked(int64_t credit_bytes) const {
  if (credit_bytes <= 0) {
    throw std::invalid_argument("credit_bytes=" + std::to_string(credit_bytes) +
                                " is invalid; pass a positive number of bytes, or None for no "
                                "credit limit");
  }
  if (mode_ == Admission::kFit) {
    for (const Entry& entry : heap_) {
      if (entry.task.bytes > credit_bytes) {
        throw std::invalid_argument(
            "credit_bytes=" + std::to_string(credit_bytes) + " is smaller than queued task " +
            std::to_string(entry.task.id) + " (" + std::to_string(entry.task.bytes) +
            " bytes), which could then never start in fit mode; raise the credit or partition "
            "the task");
      }
    }
  }
}

void PriorityQueue::Post(int64_t id, int64_t priority, int64_t bytes) {
  if (id < 0) {
    throw std::invalid_argument("task id=" + std::to_string(id) +
                                " is invalid; ids are non-negative integers");
  }
  if (bytes < 0) {
    throw std::invalid_argument("task " + std::to_string(id) + ": bytes=" +
                                std::to_string(bytes) + " is invalid; sizes are >= 0");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) {
      throw QueueClosed("task " + std::to_string(id) +
                        " posted after the queue was closed; post before shutdown()");
    }
    if (mode_ == Admission::kFit && bytes > credit_bytes_) {
      throw std::invalid_argument(
          "task " + std::to_string(id) + " has " + std::to_string(bytes) +
          " bytes, more than credit_bytes=" + CreditText(credit_bytes_) +
          ", so it could never start in fit mode; partition it or raise the credit");
    }
    if (!slots_.emplace(id, Slot{false, bytes}).second) {
      throw std::invalid_argument("task id=" + std::to_string(id) +
                                  " is already queued or in flight; ids must be unique until "
                                  "the task is completed");
    }
    PushLocked(Task{id, priority, bytes}, next_seq_++);
    stats_.posted++;
  }
  ready_cv_.notify_one();
}

void PriorityQueue::PushLocked(const Task& task, int64_t seq) {
  heap_.push_back(Entry{task.priority, seq, task});
  std::push_heap(heap_.begin(), heap_.end(), LessUrgent());
  stats_.queued++;
}

bool PriorityQueue::AdmissibleLocked() const {
  if (heap_.empty()) return false;
  if (stats_.in_flight == 0) return true;  // an idle link always takes the most urgent task
  if (mode_ == Admission::kOvershoot) return stats_.bytes_in_flight < credit_bytes_;
  return heap_.front().task.bytes <= credit_bytes_ - stats_.bytes_in_flight;
}

Task PriorityQueue::TakeHeadLocked() {
  std::pop_heap(heap_.begin(), heap_.end(), LessUrgent());
  const Task task = heap_.back().task;
  heap_.pop_back();
  slots_.find(task.id)->second.in_flight = true;
  stats_.queued--;
  stats_.in_flight++;
  stats_.dispatched++;
  stats_.bytes_in_flight += task.bytes;
  if (stats_.bytes_in_flight > stats_.peak_bytes_in_flight) {
    stats_.peak_bytes_in_flight = stats_.bytes_in_flight;
  }
  return task;
}

std::optional<Task> PriorityQueue::TryPop() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!AdmissibleLocked()) return std::nullopt;
  return TakeHeadLocked();
}

std::vector<Task> PriorityQueue::TryPopMany(size_t max_tasks) {
  std::vector<Task> out;
  std::lock_guard<std::mutex> lock(mu_);
  while (out.size() < max_tasks && AdmissibleLocked()) out.push_back(TakeHeadLocked());
  return out;
}

bool PriorityQueue::WaitAdmissibleLocked(std::unique_lock<std::mutex>& lock, double timeout_s) {
  auto done = [this] {
    return AdmissibleLocked() || interrupted_ || (closed_ && heap_.empty());
  };
  if (timeout_s < 0) {
    ready_cv_.wait(lock, done);
  } else {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(timeout_s));
    ready_cv_.wait_until(lock, deadline, done);
  }
  return AdmissibleLocked() && !interrupted_;
}

std::optional<Task> PriorityQueue::Pop(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!WaitAdmissibleLocked(lock, timeout_s)) return std::nullopt;
  return TakeHeadLocked();
}

std::vector<Task> PriorityQueue::PopMany(size_t max_tasks, double timeout_s) {
  std::vector<Task> out;
  std::unique_lock<std::mutex> lock(mu_);
  if (!WaitAdmissibleLocked(lock, timeout_s)) return out;
  while (out.size() < max_tasks && AdmissibleLocked()) out.push_back(TakeHeadLocked());
  return out;
}

void PriorityQueue::Complete(int64_t id) {
  bool wake_ready = false;
  bool wake_idle = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = slots_.find(id);
    if (it == slots_.end() || !it->second.in_flight) {
      std::string state = it != slots_.end() ? "it is still queued (pop or dispatch it first)"
                                              : "it was never posted or was completed already";
      throw std::invalid_argument("complete(" + std::to_string(id) +
                                  "): task is not in flight; " + state);
    }
    stats_.bytes_in_flight -= it->second.bytes;
    stats_.in_flight--;
    stats_.completed++;
    slots_.erase(it);
    // Wake only whom this can concern: a waiter for credit needs a queued task, a waiter for
    // idleness an empty queue. Waking them on every completion costs a futex call per task.
    wake_ready = !heap_.empty();
    wake_idle = heap_.empty() && stats_.in_flight == 0;
  }
  if (wake_ready) ready_cv_.notify_all();
  if (wake_idle) idle_cv_.notify_all();
}

void PriorityQueue::Return(const std::vector<Task>& tasks) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const Task& task : tasks) {
      auto slot = slots_.find(task.id);
      if (slot == slots_.end() || !slot->second.in_flight) {
        throw std::invalid_argument("return(" + std::to_string(task.id) +
                                    "): task is not in flight");
      }
    }
    for (auto it = tasks.rbegin(); it != tasks.rend(); ++it) {
      slots_.find(it->id)->second.in_flight = false;
      stats_.in_flight--;
      stats_.bytes_in_flight -= it->bytes;
      stats_.dispatched--;
      PushLocked(*it, --returned_seq_);
    }
  }
  ready_cv_.notify_all();
  idle_cv_.notify_all();
}

void PriorityQueue::SetCredit(int64_t credit_bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ValidateCreditLocked(credit_bytes);
    credit_bytes_ = credit_bytes;
    stats_.credit_bytes = credit_bytes;
  }
  ready_cv_.notify_all();
}

void PriorityQueue::Close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  ready_cv_.notify_all();
  idle_cv_.notify_all();
}

std::vector<Task> PriorityQueue::TakeQueued() {
  std::vector<Task> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::sort_heap(heap_.begin(), heap_.end(), LessUrgent());  // least urgent first
    out.reserve(heap_.size());
    for (auto it = heap_.rbegin(); it != heap_.rend(); ++it) {
      out.push_back(it->task);
      slots_.erase(it->task.id);
    }
    heap_.clear();
    stats_.queued = 0;
  }
  idle_cv_.notify_all();
  return out;
}

bool PriorityQueue::WaitIdle(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  auto idle = [this] { return (heap_.empty() && stats_.in_flight == 0) || interrupted_; };
  if (timeout_s < 0) {
    idle_cv_.wait(lock, idle);
    return heap_.empty() && stats_.in_flight == 0;
  }
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s));
  if (!idle_cv_.wait_until(lock, deadline, idle)) {
    std::ostringstream msg;
    msg << "queue not idle after " << timeout_s << " s: " << stats_.queued << " queued, "
        << stats_.in_flight << " in flight (" << stats_.bytes_in_flight
        << " bytes); were all dispatched tasks completed?";
    throw QueueTimeout(msg.str());
  }
  return heap_.empty() && stats_.in_flight == 0;
}

void PriorityQueue::Interrupt() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    interrupted_ = true;
  }
  ready_cv_.notify_all();
  idle_cv_.notify_all();
}

bool PriorityQueue::interrupted() const {
  std::lock_guard<std::mutex> lock(mu_);
  return interrupted_;
}

bool PriorityQueue::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

Stats PriorityQueue::GetStats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace legato
