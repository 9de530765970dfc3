"""The communication priority queue: native and pure-Python implementations, one contract."""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from legato.core.scheduler import NATIVE_AVAILABLE, make_queue

IMPLS = [
    pytest.param("native", marks=pytest.mark.skipif(
        not NATIVE_AVAILABLE, reason="legato._native is not built (pip install -e .)")),
    "python",
]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def drain_pull(q):
    """Pop and complete until empty; returns the dispatch order of ids."""
    order = []
    while (t := q.try_pop()) is not None:
        order.append(t.id)
        q.complete(t.id)
    return order


# -- ordering and admission ------------------------------------------------------------------

def test_priority_then_fifo(impl):
    q = make_queue(None, impl=impl)
    for task_id, prio in [(0, 5), (1, 1), (2, 5), (3, 0), (4, 1), (5, -2)]:
        q.post(task_id, prio, 10)
    assert drain_pull(q) == [5, 3, 1, 4, 0, 2]


def test_task_fields(impl):
    q = make_queue(None, impl=impl)
    q.post(7, 3, 123)
    t = q.try_pop()
    assert (t.id, t.priority, t.bytes) == (7, 3, 123)
    assert t == (7, 3, 123)
    assert repr(t).endswith("Task(id=7, priority=3, bytes=123)")


def test_overshoot_starts_while_credit_left(impl):
    q = make_queue(100, "overshoot", impl=impl)
    for i in range(4):
        q.post(i, i, 60)
    a, b = q.try_pop(), q.try_pop()  # 60 < 100: second starts, 120 in flight
    assert (a.id, b.id) == (0, 1)
    assert q.try_pop() is None  # no credit left
    assert q.stats()["bytes_in_flight"] == 120
    q.complete(0)  # 60 in flight: credit left again
    assert q.try_pop().id == 2


def test_fit_starts_only_what_fits(impl):
    q = make_queue(100, "fit", impl=impl)
    for i in range(3):
        q.post(i, i, 60)
    assert q.try_pop().id == 0
    assert q.try_pop() is None  # 60 + 60 > 100
    q.complete(0)
    assert q.try_pop().id == 1


def test_fit_is_strict_priority_no_overtaking(impl):
    q = make_queue(100, "fit", impl=impl)
    q.post(0, 0, 70)
    q.post(1, 1, 50)  # does not fit beside 0
    q.post(2, 2, 10)  # would fit, but must not overtake 1
    assert q.try_pop().id == 0
    assert q.try_pop() is None


def test_idle_link_takes_oversized_task_in_overshoot(impl):
    q = make_queue(10, "overshoot", impl=impl)
    q.post(0, 0, 1000)
    assert q.try_pop().id == 0


def test_fit_refuses_task_larger_than_credit(impl):
    q = make_queue(100, "fit", impl=impl)
    with pytest.raises(ValueError, match="more than credit_bytes=100"):
        q.post(0, 0, 101)


def test_set_credit_applies_to_next_admission(impl):
    q = make_queue(50, "overshoot", impl=impl)
    for i in range(3):
        q.post(i, i, 40)
    assert [q.try_pop().id, q.try_pop().id] == [0, 1]
    assert q.try_pop() is None
    q.set_credit(1000)
    assert q.try_pop().id == 2
    assert q.credit_bytes == 1000
    q.set_credit(None)
    assert q.stats()["credit_bytes"] is None


def test_set_credit_fit_refuses_to_strand_a_queued_task(impl):
    q = make_queue(100, "fit", impl=impl)
    q.post(0, 0, 80)
    with pytest.raises(ValueError, match="queued task 0"):
        q.set_credit(50)


def test_stats(impl):
    q = make_queue(1000, impl=impl)
    for i in range(3):
        q.post(i, 0, 100 * (i + 1))
    q.try_pop()
    q.try_pop()
    s = q.stats()
    assert s == {"queued": 1, "in_flight": 2, "bytes_in_flight": 300, "peak_bytes_in_flight": 300,
                 "posted": 3, "dispatched": 2, "completed": 0, "failed": 0, "credit_bytes": 1000}
    q.complete(0)
    q.complete(1)
    q.try_pop()
    s = q.stats()
    assert (s["bytes_in_flight"], s["peak_bytes_in_flight"], s["completed"]) == (300, 300, 2)


def test_pop_many_takes_every_admissible_task(impl):
    q = make_queue(250, impl=impl)
    for i in range(5):
        q.post(i, i, 100)
    assert [t.id for t in q.pop_many(10, timeout_s=1)] == [0, 1, 2]
    assert q.try_pop_many(10) == []


# -- bad arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("credit", [0, -1])
def test_bad_credit(impl, credit):
    with pytest.raises(ValueError, match=f"credit_bytes={credit} is invalid"):
        make_queue(credit, impl=impl)


def test_bad_mode(impl):
    with pytest.raises(ValueError, match="mode='greedy' is unknown"):
        make_queue(10, "greedy", impl=impl)


def test_bad_task_arguments(impl):
    q = make_queue(None, impl=impl)
    with pytest.raises(ValueError, match="bytes=-5 is invalid"):
        q.post(1, 0, -5)
    with pytest.raises(ValueError, match="id=-1 is invalid"):
        q.post(-1, 0, 5)
    q.post(1, 0, 5)
    with pytest.raises(ValueError, match="already queued or in flight"):
        q.post(1, 0, 5)


def test_completion_errors(impl):
    q = make_queue(None, impl=impl)
    with pytest.raises(ValueError, match=r"complete\(9\).*never posted"):
        q.complete(9)
    q.post(1, 0, 5)
    with pytest.raises(ValueError, match="still queued"):
        q.complete(1)
    q.try_pop()
    q.complete(1)
    with pytest.raises(ValueError, match="completed already"):
        q.complete(1)
    q.post(1, 0, 5)  # an id may be reused once its task is completed


def test_bad_timeouts_and_counts(impl):
    q = make_queue(None, impl=impl)
    with pytest.raises(ValueError, match="timeout_s=-1"):
        q.pop(timeout_s=-1)
    with pytest.raises(ValueError, match="max_tasks=0"):
        q.try_pop_many(0)


def test_make_queue_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl='rust'"):
        make_queue(impl="rust")


# -- blocking pull API -----------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_pop_waits_for_post_and_for_credit(impl):
    q = make_queue(100, "fit", impl=impl)
    assert q.pop(timeout_s=0.05) is None
    got = []
    consumer = threading.Thread(target=lambda: got.append(q.pop(timeout_s=10)))
    consumer.start()
    time.sleep(0.05)
    q.post(0, 0, 100)
    consumer.join(10)
    assert got and got[0].id == 0
    q.post(1, 0, 100)  # no credit until 0 completes
    consumer = threading.Thread(target=lambda: got.append(q.pop(timeout_s=10)))
    consumer.start()
    time.sleep(0.05)
    assert consumer.is_alive()
    q.complete(0)
    consumer.join(10)
    assert got[1].id == 1


@pytest.mark.timeout(30)
def test_pop_returns_none_once_closed_and_empty(impl):
    q = make_queue(None, impl=impl)
    q.post(0, 0, 1)
    q.shutdown(drain=False)
    assert q.pop(timeout_s=5) is None


# -- dispatcher thread and shutdown ----------------------------------------------------------

@pytest.mark.timeout(60)
def test_dispatcher_runs_every_task_in_priority_order(impl):
    q = make_queue(None, impl=impl)
    for i in range(200):
        q.post(i, -i, 8)  # posted before start: strict reverse order expected
    seen = []

    def executor(task):
        seen.append(task.id)
        q.complete(task.id)

    q.start(executor)
    assert q.shutdown(timeout_s=30) == []
    assert seen == list(range(199, -1, -1))
    assert q.stats()["completed"] == 200 and not q.running


@pytest.mark.timeout(60)
def test_shutdown_drain_waits_for_asynchronous_completions(impl):
    q = make_queue(64, impl=impl)
    done = []

    def executor(task):  # completes later, on another thread, as a backend would
        threading.Timer(0.002, lambda: (done.append(task.id), q.complete(task.id))).start()

    q.start(executor)
    for i in range(50):
        q.post(i, i % 3, 32)
    q.shutdown(timeout_s=30)
    assert sorted(done) == list(range(50))
    assert q.stats()["peak_bytes_in_flight"] <= 64 + 32


@pytest.mark.timeout(60)
def test_shutdown_without_drain_hands_back_queued_tasks(impl):
    q = make_queue(10, "fit", impl=impl)
    started = []
    q.start(lambda task: started.append(task.id))  # never completes: credit stays used
    for i in range(5):
        q.post(i, i, 10)
    deadline = time.monotonic() + 10
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    back = q.shutdown(drain=False)
    assert started == [0]
    assert [t.id for t in back] == [1, 2, 3, 4]
    assert q.stats()["queued"] == 0
    with pytest.raises(RuntimeError, match="posted after the queue was closed"):
        q.post(9, 0, 1)
    q.complete(0)


@pytest.mark.timeout(60)
def test_drain_times_out_when_a_task_is_never_completed(impl):
    q = make_queue(None, impl=impl)
    q.start(lambda task: None)
    q.post(0, 0, 1)
    with pytest.raises(TimeoutError, match="1 in flight"):
        q.shutdown(timeout_s=0.2)
    q.complete(0)
    q.wait_idle(timeout_s=5)


@pytest.mark.timeout(60)
def test_drain_timeout_covers_tasks_waiting_for_credit(impl):
    q = make_queue(10, "fit", impl=impl)
    q.start(lambda task: None)  # takes the whole credit and never gives it back
    for i in range(3):
        q.post(i, i, 10)
    with pytest.raises(TimeoutError, match="2 queued, 1 in flight"):
        q.shutdown(timeout_s=0.3)
    assert [t.id for t in q.shutdown(drain=False)] == [1, 2]
    q.complete(0)


@pytest.mark.timeout(60)
def test_executor_error_wakes_a_waiting_shutdown(impl):
    q = make_queue(None, impl=impl)
    gate = threading.Event()

    def executor(task):
        gate.wait(10)
        raise OSError("link down")

    q.start(executor)
    for i in range(4):
        q.post(i, i, 1)
    threading.Timer(0.2, gate.set).start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="executor raised on task 0: OSError: link down"):
        q.shutdown(timeout_s=30)
    assert time.monotonic() - start < 10
    with pytest.raises(RuntimeError, match="executor raised"):
        q.wait_idle(timeout_s=1)
    assert [t.id for t in q.shutdown(drain=False)] == [1, 2, 3]


@pytest.mark.timeout(60)
def test_executor_error_stops_dispatch_and_keeps_tasks(impl):
    q = make_queue(None, impl=impl)
    for i in range(6):
        q.post(i, i, 1)

    def executor(task):
        if task.id == 2:
            raise KeyError("boom")
        q.complete(task.id)

    q.start(executor)
    deadline = time.monotonic() + 10
    while q.running and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="executor raised on task 2: KeyError"):
        q.shutdown()
    back = q.shutdown(drain=False)
    assert [t.id for t in back] == [3, 4, 5]
    (task, err), = q.failures
    assert task.id == 2 and isinstance(err, KeyError)
    assert q.stats()["failed"] == 1


@pytest.mark.timeout(30)
def test_start_twice_and_pull_while_dispatching_are_errors(impl):
    q = make_queue(None, impl=impl)
    q.start(lambda task: q.complete(task.id))
    with pytest.raises(RuntimeError, match="already running"):
        q.start(lambda task: None)
    with pytest.raises(RuntimeError, match="competes with the running dispatcher"):
        q.pop(timeout_s=0)
    q.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        q.start(lambda task: None)


# -- properties (hypothesis) -----------------------------------------------------------------

task_lists = st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 2000)), min_size=1,
                      max_size=60)
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(tasks=task_lists, credit=st.integers(1, 3000), mode=st.sampled_from(["overshoot", "fit"]),
       completion_seed=st.integers(0, 2**32))
def test_property_credit_bound_and_priority_order(impl, tasks, credit, mode, completion_seed):
    """Bytes in flight never exceed the credit (plus the largest task in overshoot mode, and a
    lone task of any size on an idle link); each start is the most urgent queued task."""
    q = make_queue(credit, mode, impl=impl)
    rng = random.Random(completion_seed)
    largest = max(size for _, size in tasks)
    expected = {}
    for task_id, (prio, size) in enumerate(tasks):
        if mode == "fit" and size > credit:
            with pytest.raises(ValueError):
                q.post(task_id, prio, size)
            continue
        q.post(task_id, prio, size)
        expected[task_id] = (prio, size)
    pending = dict(expected)  # queued, not started
    flight: dict[int, int] = {}
    started = []
    while pending or flight:
        t = q.try_pop()
        if t is not None:
            head = min(pending.items(), key=lambda kv: (kv[1][0], kv[0]))[0]
            assert t.id == head, "dispatch must follow priority, FIFO among equals"
            del pending[t.id]
            flight[t.id] = t.bytes
            started.append(t.id)
            in_flight = sum(flight.values())
            if len(flight) > 1:
                bound = credit + (largest if mode == "overshoot" else 0)
                assert in_flight <= bound
                assert q.stats()["bytes_in_flight"] == in_flight
            continue
        assert flight, "an idle queue with pending tasks must admit one"
        done = rng.choice(sorted(flight))
        q.complete(done)
        del flight[done]
    assert sorted(started) == sorted(expected)
    s = q.stats()
    assert s["completed"] == len(expected) and s["bytes_in_flight"] == 0


@PROPERTY
@given(tasks=task_lists, producers=st.integers(1, 4), credit=st.integers(500, 5000))
@pytest.mark.timeout(120)
def test_property_concurrent_producers_no_loss_no_duplicates(impl, tasks, producers, credit):
    """Several producer threads post while the dispatcher runs: every task runs exactly once."""
    q = make_queue(credit, "overshoot", impl=impl)
    seen = []
    lock = threading.Lock()

    def executor(task):
        with lock:
            seen.append(task.id)
        q.complete(task.id)

    q.start(executor, batch=8)
    ids = list(range(len(tasks) * producers))

    def produce(p):
        for j, (prio, size) in enumerate(tasks):
            q.post(p * len(tasks) + j, prio, size)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    q.shutdown(timeout_s=30)
    assert sorted(seen) == ids
    assert len(set(seen)) == len(seen)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stress_many_threads_async_completion(impl):
    """8 producers, completions from a pool of completer threads, a tight credit window."""
    n_producers, per_producer = 8, 3000 if impl == "native" else 1500
    q = make_queue(4096, "overshoot", impl=impl)
    inbox: list[int] = []
    cv = threading.Condition()
    completed = []
    stop = False

    def executor(task):
        with cv:
            inbox.append(task.id)
            cv.notify()

    def completer():
        while True:
            with cv:
                while not inbox and not stop:
                    cv.wait(0.1)
                if not inbox and stop:
                    return
                task_id = inbox.pop(random.randrange(len(inbox)))
            q.complete(task_id)
            completed.append(task_id)

    completers = [threading.Thread(target=completer) for _ in range(3)]
    for c in completers:
        c.start()
    q.start(executor, batch=16)

    def produce(p):
        rng = random.Random(p)
        for j in range(per_producer):
            q.post(p * per_producer + j, rng.randint(0, 50), rng.randint(0, 1024))

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(n_producers)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(120)
    q.shutdown(timeout_s=120)
    with cv:
        stop = True
        cv.notify_all()
    for c in completers:
        c.join(30)
    total = n_producers * per_producer
    assert sorted(completed) == list(range(total))
    s = q.stats()
    assert s["completed"] == total and s["queued"] == 0 and s["in_flight"] == 0
    assert s["peak_bytes_in_flight"] <= 4096 + 1024
