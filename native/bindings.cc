// Python bindings for legato's priority queue (module legato._native), plus the dispatcher
// thread that hands admitted tasks to a Python executor.
//
// [Note: GIL discipline] The queue's mutex is never held while the GIL is requested: the
// dispatcher takes tasks under the mutex with the GIL released, drops the mutex, then takes the
// GIL to call the executor. Blocking calls (pop, pop_many, shutdown, wait_idle) release the GIL.
// post/complete/try_pop keep it: they hold the mutex for well under a microsecond and never wait.
//
// [Note: fast path] post, try_pop and complete are called once per task from Python, and Task
// objects are made once per task, so they bypass pybind11's generic dispatch: the three methods
// are METH_FASTCALL functions attached to the class, and Task is a struct sequence (a tuple with
// named fields, like os.stat_result). pybind11 serves everything else. This takes the per-task
// cost from about 1.4 us to about 0.4 us (benchmarks/native_queue.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <memory>
#include <thread>

#include "nccl.h"
#include "priority_queue.h"

namespace py = pybind11;

namespace legato {
namespace {

#ifndef LEGATO_BUILD_FLAGS
#define LEGATO_BUILD_FLAGS "unknown"
#endif

int64_t CreditFromPython(const py::object& credit_bytes) {
  if (credit_bytes.is_none()) return PriorityQueue::kUnlimited;
  return credit_bytes.cast<int64_t>();
}

py::object CreditToPython(int64_t credit_bytes) {
  if (credit_bytes == PriorityQueue::kUnlimited) return py::none();
  return py::int_(credit_bytes);
}

// -- Task as a struct sequence ----------------------------------------------------------------

PyStructSequence_Field kTaskFields[] = {
    {"id", "task id, unique while the task is queued or in flight"},
    {"priority", "lower is more urgent; FIFO among equal priorities"},
    {"bytes", "size charged against the credit window"},
    {nullptr, nullptr}};
PyStructSequence_Desc kTaskDesc = {
    "legato._native.Task",
    "A communication task: (id, priority, bytes), a tuple with named fields.",
    kTaskFields, 3};
PyTypeObject* g_task_type = nullptr;
PyObject* g_queue_closed = nullptr;

// New reference, or nullptr with a Python error set.
PyObject* MakeTask(const Task& t) {
  PyObject* obj = PyStructSequence_New(g_task_type);
  if (obj == nullptr) return nullptr;
  const int64_t fields[3] = {t.id, t.priority, t.bytes};
  for (Py_ssize_t i = 0; i < 3; ++i) {
    PyObject* value = PyLong_FromLongLong(fields[i]);
    if (value == nullptr) {
      Py_DECREF(obj);
      return nullptr;
    }
    PyStructSequence_SET_ITEM(obj, i, value);
  }
  return obj;
}

py::object TaskObject(const Task& t) {
  PyObject* obj = MakeTask(t);
  if (obj == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(obj);
}

py::object OptionalTask(const std::optional<Task>& t) {
  return t ? TaskObject(*t) : py::none();
}

py::list TaskList(const std::vector<Task>& tasks) {
  py::list out(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) out[i] = TaskObject(tasks[i]);
  return out;
}

double TimeoutFromPython(const py::object& timeout_s) {
  if (timeout_s.is_none()) return -1.0;
  const double value = timeout_s.cast<double>();
  if (value < 0) {
    throw std::invalid_argument("timeout_s=" + std::to_string(value) +
                                " is invalid; pass a non-negative number of seconds or None");
  }
  return value;
}

// The queue as Python sees it: the core queue plus an optional dispatcher thread.
class PyQueue {
 public:
  PyQueue(const py::object& credit_bytes, const std::string& mode)
      : queue_(CreditFromPython(credit_bytes), ParseAdmission(mode)) {}

  ~PyQueue() {
    StopThread();
    const Stats stats = queue_.GetStats();
    if ((stats.queued > 0 || stats.in_flight > 0) &&
        PyErr_WarnFormat(PyExc_ResourceWarning, 1,
                         "legato PriorityQueue destroyed with %lld queued and %lld in-flight "
                         "tasks; call shutdown() first",
                         static_cast<long long>(stats.queued),
                         static_cast<long long>(stats.in_flight)) < 0) {
      PyErr_WriteUnraisable(nullptr);  // warnings turned into errors: a destructor cannot raise
    }
  }

  void Post(int64_t id, int64_t priority, int64_t bytes) { queue_.Post(id, priority, bytes); }

  std::optional<Task> TryPop() { return queue_.TryPop(); }

  py::list TryPopMany(int64_t max_tasks) { return TaskList(queue_.TryPopMany(CheckMax(max_tasks))); }

  py::object Pop(const py::object& timeout_s) {
    RequirePull("pop");
    const double timeout = TimeoutFromPython(timeout_s);
    std::optional<Task> task;
    {
      py::gil_scoped_release release;
      task = queue_.Pop(timeout);
    }
    return OptionalTask(task);
  }

  py::list PopMany(int64_t max_tasks, const py::object& timeout_s) {
    RequirePull("pop_many");
    const double timeout = TimeoutFromPython(timeout_s);
    const size_t max = CheckMax(max_tasks);
    std::vector<Task> tasks;
    {
      py::gil_scoped_release release;
      tasks = queue_.PopMany(max, timeout);
    }
    return TaskList(tasks);
  }

  void Complete(int64_t id) { queue_.Complete(id); }

  void SetCredit(const py::object& credit_bytes) {
    queue_.SetCredit(CreditFromPython(credit_bytes));
  }

  void Start(py::object executor, int64_t batch) {
    if (!PyCallable_Check(executor.ptr())) {
      throw py::type_error("executor must be callable as executor(task)");
    }
    if (thread_) {
      throw std::runtime_error("the dispatcher is already running; call start() once");
    }
    if (queue_.closed()) {
      throw std::runtime_error("the queue is shut down; create a new queue to dispatch again");
    }
    batch_ = CheckMax(batch);
    executor_ = std::move(executor);
    thread_ = std::make_unique<std::thread>([this] { DispatchLoop(); });
  }

  py::list Shutdown(bool drain, const py::object& timeout_s) {
    const double timeout = TimeoutFromPython(timeout_s);
    queue_.Close();
    if (!drain) {
      StopThread();
      return TaskList(queue_.TakeQueued());
    }
    // Drain: wait until every task is dispatched and completed (the timeout covers both), or
    // until the dispatcher stops on an executor error (it interrupts the queue).
    ThrowIfFailed();
    {
      py::gil_scoped_release release;
      queue_.WaitIdle(timeout);
      if (thread_) thread_->join();  // closed and empty, or stopped: it exits at once
    }
    thread_.reset();
    ThrowIfFailed();
    return py::list();
  }

  void WaitIdle(const py::object& timeout_s) {
    const double timeout = TimeoutFromPython(timeout_s);
    {
      py::gil_scoped_release release;
      queue_.WaitIdle(timeout);
    }
    ThrowIfFailed();
  }

  py::dict StatsDict() const {
    const Stats s = queue_.GetStats();
    py::dict d;
    d["queued"] = s.queued;
    d["in_flight"] = s.in_flight;
    d["bytes_in_flight"] = s.bytes_in_flight;
    d["peak_bytes_in_flight"] = s.peak_bytes_in_flight;
    d["posted"] = s.posted;
    d["dispatched"] = s.dispatched;
    d["completed"] = s.completed;
    d["failed"] = static_cast<int64_t>(failures_.size());
    d["credit_bytes"] = CreditToPython(s.credit_bytes);
    return d;
  }

  py::list Failures() const {
    py::list out;
    for (const auto& failure : failures_) {
      out.append(py::make_tuple(TaskObject(failure.first), failure.second));
    }
    return out;
  }

  std::string mode() const { return AdmissionName(queue_.mode()); }
  py::object credit_bytes() const { return CreditToPython(queue_.GetStats().credit_bytes); }
  bool closed() const { return queue_.closed(); }
  bool running() const { return thread_ != nullptr && !done_.load(); }

 private:
  static size_t CheckMax(int64_t max_tasks) {
    if (max_tasks <= 0) {
      throw std::invalid_argument("max_tasks=" + std::to_string(max_tasks) +
                                  " is invalid; pass a positive count");
    }
    return static_cast<size_t>(max_tasks);
  }

  void RequirePull(const char* what) const {
    if (thread_) {
      throw std::runtime_error(std::string(what) +
                               "() competes with the running dispatcher for tasks; use either "
                               "start(executor) or the pull API, not both");
    }
  }

  void DispatchLoop() {
    // [Note: one thread state] Without an outer acquire, every gil_scoped_acquire on this
    // foreign thread would create and destroy a PyThreadState (several microseconds each). The
    // outer pair creates it once and leaves the GIL released; the inner acquire reuses it.
    py::gil_scoped_acquire thread_state;
    py::gil_scoped_release unlocked;
    while (true) {
      std::vector<Task> batch = queue_.PopMany(batch_, -1.0);
      if (batch.empty()) break;  // interrupted, or closed with nothing left to dispatch
      py::gil_scoped_acquire gil;
      for (size_t i = 0; i < batch.size(); ++i) {
        PyObject* task = MakeTask(batch[i]);
        PyObject* result = task ? PyObject_CallOneArg(executor_.ptr(), task) : nullptr;
        Py_XDECREF(task);
        if (result != nullptr) {
          Py_DECREF(result);
          continue;
        }
        {
          py::error_already_set err;
          // The executor did not start this task: give its credit back, keep the error, and stop
          // dispatching so a broken executor does not consume the rest of the queue. Tasks taken
          // in this batch but not yet handed over go back to the queue.
          queue_.Complete(batch[i].id);
          failures_.emplace_back(batch[i], err.value());
          queue_.Return(std::vector<Task>(batch.begin() + static_cast<std::ptrdiff_t>(i) + 1,
                                          batch.end()));
          break;
        }
      }
      if (!failures_.empty()) break;
    }
    done_.store(true);
    if (!failures_.empty()) queue_.Interrupt();  // wake shutdown() and wait_idle()
  }

  void StopThread() {
    if (!thread_) return;
    queue_.Interrupt();
    {
      py::gil_scoped_release release;
      thread_->join();
    }
    thread_.reset();
  }

  void ThrowIfFailed() const {
    if (failures_.empty()) return;
    throw std::runtime_error(FailureText() +
                             "; the dispatcher stopped and queued tasks are kept: call "
                             "shutdown(drain=False) to take them back");
  }

  std::string FailureText() const {
    const auto& first = failures_.front();
    std::string message = py::str(first.second);
    std::string type = py::str(py::type::handle_of(first.second).attr("__name__"));
    return "executor raised on task " + std::to_string(first.first.id) + ": " + type + ": " +
           message;
  }

  PriorityQueue queue_;
  py::object executor_;
  size_t batch_ = 64;
  std::unique_ptr<std::thread> thread_;
  std::atomic<bool> done_{false};
  std::vector<std::pair<Task, py::object>> failures_;
};

// -- fast path (see [Note: fast path]) -------------------------------------------------------

PyQueue* SelfQueue(PyObject* self) { return py::handle(self).cast<PyQueue*>(); }

bool ArgsToInt64(const char* what, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t expect,
                 int64_t* out) {
  if (nargs != expect) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd positional arguments, got %zd", what, expect,
                 nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < expect; ++i) {
    out[i] = PyLong_AsLongLong(args[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

// Translate the exceptions the queue throws into Python errors; returns nullptr.
PyObject* SetPythonError() {
  try {
    throw;
  } catch (const QueueClosed& e) {
    PyErr_SetString(g_queue_closed, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const py::error_already_set& e) {
    py::error_already_set copy = e;
    copy.restore();
  } catch (const py::cast_error& e) {
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* FastPost(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[3];
  if (!ArgsToInt64("post(id, priority, bytes)", args, nargs, 3, v)) return nullptr;
  try {
    SelfQueue(self)->Post(v[0], v[1], v[2]);
  } catch (...) {
    return SetPythonError();
  }
  Py_RETURN_NONE;
}

PyObject* FastComplete(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int64_t id;
  if (!ArgsToInt64("complete(id)", args, nargs, 1, &id)) return nullptr;
  try {
    SelfQueue(self)->Complete(id);
  } catch (...) {
    return SetPythonError();
  }
  Py_RETURN_NONE;
}

PyObject* FastTryPop(PyObject* self, PyObject* const*, Py_ssize_t nargs) {
  if (nargs != 0) {
    PyErr_SetString(PyExc_TypeError, "try_pop() takes no arguments");
    return nullptr;
  }
  std::optional<Task> task;
  try {
    task = SelfQueue(self)->TryPop();
  } catch (...) {
    return SetPythonError();
  }
  if (!task) Py_RETURN_NONE;
  return MakeTask(*task);
}

PyMethodDef kFastMethods[] = {
    {"post", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(FastPost)),
     METH_FASTCALL,
     "post(id, priority, bytes, /)\n--\n\nQueue a task. ValueError for a negative id or size, an "
     "id already queued or in flight, or (fit mode) a task larger than the credit; QueueClosed "
     "after shutdown()."},
    {"complete", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(FastComplete)),
     METH_FASTCALL,
     "complete(id, /)\n--\n\nReport a task done and return its credit. ValueError if the task is "
     "not in flight."},
    {"try_pop", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(FastTryPop)),
     METH_FASTCALL,
     "try_pop()\n--\n\nTake the most urgent task if the credit window admits it now, else None."},
    {nullptr, nullptr, 0, nullptr}};

void AttachFastMethods(py::handle cls) {
  for (PyMethodDef* def = kFastMethods; def->ml_name != nullptr; ++def) {
    PyObject* descr = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(cls.ptr()), def);
    if (descr == nullptr) throw py::error_already_set();
    const int rc = PyObject_SetAttrString(cls.ptr(), def->ml_name, descr);
    Py_DECREF(descr);
    if (rc != 0) throw py::error_already_set();
  }
}

// -- NCCL all-reduce (see nccl.h) ------------------------------------------------------------
//
// [Note: NCCL callbacks] all_reduce hands the Python callback to the C++ communicator as an
// owned reference inside a Completion; the communicator calls each Completion exactly once, on
// its poller thread or on the thread calling close()/abort() (with the GIL released), and the
// Completion takes the GIL, calls callback(None or NcclError(...)) and drops the reference.
// Every NCCL/CUDA call runs with the GIL released.

PyObject* g_nccl_error = nullptr;

bool InterpreterFinalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

// Takes the GIL, calls `callback(None)` or `callback(NcclError(error))`, drops the reference.
void InvokeNcclCallback(PyObject* callback, const std::string& error) {
  if (InterpreterFinalizing()) return;  // too late to run Python; the reference is left behind
  py::gil_scoped_acquire gil;
  PyObject* arg = nullptr;
  if (error.empty()) {
    arg = Py_NewRef(Py_None);
  } else {
    PyObject* text = PyUnicode_FromStringAndSize(error.data(), static_cast<Py_ssize_t>(error.size()));
    arg = text ? PyObject_CallOneArg(g_nccl_error, text) : nullptr;
    Py_XDECREF(text);
  }
  PyObject* result = arg ? PyObject_CallOneArg(callback, arg) : nullptr;
  if (result == nullptr) {
    PyErr_WriteUnraisable(callback);  // nobody to raise to on the poller thread
  }
  Py_XDECREF(result);
  Py_XDECREF(arg);
  Py_DECREF(callback);
}

std::string NcclVersionText(int code) {
  if (code <= 0) return "";
  // NCCL_VERSION(X, Y, Z): X*1000 + Y*100 + Z up to 2.8, X*10000 + Y*100 + Z from 2.9 on.
  const int major = code >= 10000 ? code / 10000 : code / 1000;
  const int minor = code >= 10000 ? (code % 10000) / 100 : (code % 1000) / 100;
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(code % 100);
}

py::dict NcclStatusDict() {
  nccl::Status s;
  {
    py::gil_scoped_release release;  // the first call dlopens NCCL and the CUDA runtime
    s = nccl::GetStatus();
  }
  py::dict d;
  d["available"] = s.available;
  d["reason"] = s.reason;
  d["version"] = s.version > 0 ? py::object(py::int_(s.version)) : py::object(py::none());
  d["version_text"] = s.version > 0 ? py::object(py::str(NcclVersionText(s.version)))
                                    : py::object(py::none());
  d["nccl_library"] = s.nccl_path.empty() ? py::object(py::none())
                                           : py::object(py::str(s.nccl_path));
  d["cudart_library"] = s.cudart_path.empty() ? py::object(py::none())
                                               : py::object(py::str(s.cudart_path));
  return d;
}

py::bytes NcclUniqueId() {
  std::string id;
  {
    py::gil_scoped_release release;
    id = nccl::NewUniqueId();
  }
  return py::bytes(id);
}

class PyNcclComm {
 public:
  PyNcclComm(const py::bytes& unique_id, int rank, int world, int device) {
    const std::string id = unique_id;
    // Arguments are checked before NCCL is loaded, so they fail the same way everywhere.
    if (id.size() != static_cast<size_t>(nccl::kUniqueIdBytes)) {
      throw std::invalid_argument("unique_id has " + std::to_string(id.size()) +
                                  " bytes; pass the 128 bytes of nccl_unique_id() from rank 0");
    }
    if (world <= 0 || rank < 0 || rank >= world) {
      throw std::invalid_argument("rank=" + std::to_string(rank) + ", world=" +
                                  std::to_string(world) +
                                  " is invalid; pass world >= 1 and 0 <= rank < world");
    }
    if (device < 0) {
      throw std::invalid_argument("device=" + std::to_string(device) +
                                  " is invalid; pass a CUDA device index >= 0");
    }
    py::gil_scoped_release release;  // ncclCommInitRank waits for every rank
    comm_ = std::make_unique<nccl::Comm>(id, rank, world, device);
  }

  ~PyNcclComm() {
    if (!comm_) return;
    py::gil_scoped_release release;  // the poller may need the GIL to finish a callback
    if (comm_->OnPollerThread()) {
      // The last reference went away inside one of this comm's own callbacks: the poller cannot
      // join itself, so another thread closes the comm once the callback has returned.
      std::thread([comm = std::move(comm_)]() mutable { comm.reset(); }).detach();
      return;
    }
    comm_.reset();
  }

  void AllReduce(uintptr_t ptr, int64_t count, const std::string& dtype, const std::string& op,
                 uintptr_t stream, uintptr_t wait_stream, const py::object& callback) {
    if (!PyCallable_Check(callback.ptr())) {
      throw py::type_error("callback must be callable as callback(error_or_None)");
    }
    if (count < 0 || (ptr == 0 && count > 0)) {
      throw std::invalid_argument("ptr=" + std::to_string(ptr) + ", count=" +
                                  std::to_string(count) +
                                  " is invalid; pass a device address and count >= 0");
    }
    const nccl::DataType data_type = nccl::ParseDataType(dtype);
    const nccl::RedOp red_op = nccl::ParseOp(op);
    nccl::Comm& comm = Get();
    PyObject* owned = Py_NewRef(callback.ptr());  // see [Note: NCCL callbacks]
    try {
      py::gil_scoped_release release;
      comm.AllReduce(ptr, static_cast<size_t>(count), data_type, red_op, stream, wait_stream,
                     [owned](const std::string& error) { InvokeNcclCallback(owned, error); });
    } catch (...) {
      Py_DECREF(owned);  // not enqueued: the completion will never run
      throw;
    }
  }

  void Close() {
    if (!comm_) return;
    py::gil_scoped_release release;
    comm_->Close();
  }

  void Abort() {
    if (!comm_) return;
    py::gil_scoped_release release;
    comm_->Abort();
  }

  bool closed() const { return !comm_ || comm_->closed(); }
  int64_t pending() const { return comm_ ? static_cast<int64_t>(comm_->pending()) : 0; }
  int rank() const { return Get().rank(); }
  int world() const { return Get().world(); }
  int device() const { return Get().device(); }

 private:
  nccl::Comm& Get() const {
    if (!comm_) throw std::runtime_error("the NcclComm was not constructed");
    return *comm_;
  }

  std::unique_ptr<nccl::Comm> comm_;
};

void BindNccl(py::module_& m) {
  g_nccl_error = PyErr_NewExceptionWithDoc(
      "legato._native.NcclError",
      "NCCL or the CUDA runtime is missing, or an NCCL/CUDA call failed; the message says which "
      "and what to do.",
      PyExc_RuntimeError, nullptr);
  if (g_nccl_error == nullptr) throw py::error_already_set();
  m.attr("NcclError") = py::handle(g_nccl_error);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const nccl::NcclUnavailable& e) {
      PyErr_SetString(g_nccl_error, e.what());
    } catch (const nccl::NcclError& e) {
      PyErr_SetString(g_nccl_error, e.what());
    }
  });

  m.def("nccl_status", &NcclStatusDict,
        "Load NCCL and the CUDA runtime if not yet tried; return {available, reason, version, "
        "version_text, nccl_library, cudart_library}. Never raises for a missing library.");
  m.def("nccl_unique_id", &NcclUniqueId,
        "A new ncclUniqueId (128 bytes) for NcclComm; make it on one rank and send it to all.");
  py::class_<PyNcclComm>(m, "NcclComm",
                         "An NCCL communicator on one CUDA device, with its own stream and a "
                         "poller thread that reports each all-reduce's completion.")
      .def(py::init<const py::bytes&, int, int, int>(), py::arg("unique_id"), py::arg("rank"),
           py::arg("world"), py::arg("device"))
      .def("all_reduce", &PyNcclComm::AllReduce, py::arg("ptr"), py::arg("count"),
           py::arg("dtype"), py::arg("op") = "sum", py::arg("stream") = 0,
           py::arg("wait_stream") = 0, py::arg("callback"),
           "Enqueue an in-place all-reduce of `count` elements at device address `ptr`; "
           "callback(None or NcclError) runs once the GPU work has finished. stream=0 uses the "
           "comm's own stream; wait_stream orders it after work already queued there. The "
           "caller keeps the buffer alive until the callback.")
      .def("close", &PyNcclComm::Close,
           "Wait for pending all-reduces, then destroy the communicator.")
      .def("abort", &PyNcclComm::Abort,
           "Abort now; pending all-reduces report an NcclError to their callbacks.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__",
           [](PyNcclComm& self, const py::object& exc_type, const py::object&,
              const py::object&) {
             // After an error the peers may never join a pending all-reduce: abort, not close.
             if (exc_type.is_none()) {
               self.Close();
             } else {
               self.Abort();
             }
             return false;
           })
      .def_property_readonly("closed", &PyNcclComm::closed)
      .def_property_readonly("pending", &PyNcclComm::pending)
      .def_property_readonly("rank", &PyNcclComm::rank)
      .def_property_readonly("world", &PyNcclComm::world)
      .def_property_readonly("device", &PyNcclComm::device);
}

}  // namespace
}  // namespace legato

PYBIND11_MODULE(_native, m) {
  using legato::PyQueue;
  using legato::Task;
  m.doc() = "legato's native communication priority queue (C++17)";

  // A plain reference kept for the life of the process: no static py::object is destroyed after
  // the interpreter has finalized.
  legato::g_queue_closed =
      PyErr_NewExceptionWithDoc("legato._native.QueueClosed",
                                "A task was posted after the queue was shut down.",
                                PyExc_RuntimeError, nullptr);
  if (legato::g_queue_closed == nullptr) throw py::error_already_set();
  m.attr("QueueClosed") = py::handle(legato::g_queue_closed);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const legato::QueueClosed& e) {
      PyErr_SetString(legato::g_queue_closed, e.what());
    }
  });
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const legato::QueueTimeout& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    }
  });

  legato::g_task_type = PyStructSequence_NewType(&legato::kTaskDesc);
  if (legato::g_task_type == nullptr) throw py::error_already_set();
  py::handle task_type(reinterpret_cast<PyObject*>(legato::g_task_type));
  m.attr("Task") = task_type;

  auto cls = py::class_<PyQueue>(m, "PriorityQueue")
      .def(py::init<const py::object&, const std::string&>(), py::arg("credit_bytes") = py::none(),
           py::arg("mode") = "overshoot")
      .def("try_pop_many", &PyQueue::TryPopMany, py::arg("max_tasks"))
      .def("pop", &PyQueue::Pop, py::arg("timeout_s") = py::none())
      .def("pop_many", &PyQueue::PopMany, py::arg("max_tasks"),
           py::arg("timeout_s") = py::none())
      .def("set_credit", &PyQueue::SetCredit, py::arg("credit_bytes"))
      .def("start", &PyQueue::Start, py::arg("executor"), py::arg("batch") = 64)
      .def("shutdown", &PyQueue::Shutdown, py::arg("drain") = true,
           py::arg("timeout_s") = py::none())
      .def("wait_idle", &PyQueue::WaitIdle, py::arg("timeout_s") = py::none())
      .def("stats", &PyQueue::StatsDict)
      .def_property_readonly("failures", &PyQueue::Failures)
      .def_property_readonly("mode", &PyQueue::mode)
      .def_property_readonly("credit_bytes", &PyQueue::credit_bytes)
      .def_property_readonly("closed", &PyQueue::closed)
      .def_property_readonly("running", &PyQueue::running);
  legato::AttachFastMethods(cls);
  legato::BindNccl(m);

  m.def("build_info", [] {
    py::dict info;
    info["compiler"] = __VERSION__;
    info["cxx_standard"] = static_cast<long>(__cplusplus);
    info["flags"] = LEGATO_BUILD_FLAGS;
#ifdef NDEBUG
    info["assertions"] = false;
#else
    info["assertions"] = true;
#endif
    info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                       std::to_string(PYBIND11_VERSION_MINOR) + "." +
                       std::to_string(PYBIND11_VERSION_PATCH);
    return info;
  });
}
