"""The scheduler core on in-process ranks: one order everywhere, priorities, failures."""

from __future__ import annotations

import random
import threading
import time

import pytest

from legato.core.scheduler.core import CommFailed, Scheduler
from legato.core.scheduler.plan import CommTask, make_plan
from legato.core.scheduler.policy import resolve_config
from legato.core.testing import LocalOrderChannel, NullBackend, ThreadCollective

SIZES = [4096, 64, 20000, 64, 8192, 128, 40000, 32]  # a gradient per layer, bytes


def make_tasks():
    return [CommTask(k, f"layer{k}.weight", layer=k, nbytes=n) for k, n in enumerate(SIZES)]


def build_ranks(world, policy, collective_delay_s=0.0, timeout_s=20.0, **settings):
    plan = make_plan(make_tasks(), partition_bytes=settings.get("partition_bytes"),
                     merge_bytes=settings.get("merge_bytes", 0))
    config = resolve_config(policy, **settings)
    collective = ThreadCollective(world, delay_s=collective_delay_s)
    channel = LocalOrderChannel(world - 1)
    done = [[] for _ in range(world)]
    ranks = []
    for r in range(world):
        ranks.append(Scheduler(
            plan, config, collective.backend(r),
            order=channel.leader() if r == 0 else channel.follower(r - 1), leader=r == 0,
            on_chunk_done=lambda chunk, r=r: done[r].append(chunk.id), rank=r,
            timeout_s=timeout_s))
    return plan, collective, ranks, done


def backward(scheduler, rng, max_delay_s):
    """Gradients become ready last layer first, with random per-layer delays."""
    for key in reversed(range(len(SIZES))):
        if max_delay_s:
            time.sleep(rng.uniform(0, max_delay_s))
        scheduler.tensor_ready(key)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("policy, settings", [
    ("fifo", {}),
    ("priority", {}),
    ("bytescheduler", dict(partition_bytes=4096, credit_bytes=8192, merge_bytes=256)),
])
def test_four_ranks_random_delays_fifty_runs_same_order(policy, settings):
    for run in range(50):
        plan, collective, ranks, done = build_ranks(4, policy, collective_delay_s=0.0005,
                                                    **settings)
        steps = 3
        errors = []

        def rank_main(r):
            rng = random.Random(run * 100 + r)
            try:
                for step in range(steps):
                    backward(ranks[r], rng, max_delay_s=0.002)
                    ranks[r].wait_steps(step + 1, timeout_s=20)
            except BaseException as err:  # noqa: BLE001
                errors.append((r, err))

        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for s in ranks:
            s.close()
        assert not errors, f"run {run}: {errors}"
        assert not collective.errors, f"run {run}: {collective.errors}"
        issued = [s.issued for s in ranks]
        assert all(seq == issued[0] for seq in issued), f"run {run}: orders differ"
        assert len(issued[0]) == steps * len(plan.chunks) == ranks[0].issued_total
        for r in range(4):
            assert sorted(done[r]) == sorted(list(range(len(plan.chunks))) * steps)


def test_window_lets_urgent_chunks_overtake():
    """priority: one message in flight; chunks that arrive meanwhile go in layer order."""
    plan = make_plan(make_tasks())
    backend = NullBackend(delay_s=0.05)
    s = Scheduler(plan, resolve_config("priority"), backend, order=None, leader=True,
                  on_chunk_done=lambda c: None)
    s.tensor_ready(7)  # starts at once: the link is idle
    deadline = time.monotonic() + 5
    while not backend.started and time.monotonic() < deadline:
        time.sleep(0.001)
    for key in (6, 5, 4, 3, 2, 1, 0):  # all queue behind it
        s.tensor_ready(key)
    s.wait_steps(1, timeout_s=10)
    s.close()
    order = [plan.chunks[c].layer for c in backend.started]
    assert order == [7, 0, 1, 2, 3, 4, 5, 6]


def test_fifo_keeps_arrival_order():
    plan = make_plan(make_tasks())
    backend = NullBackend(delay_s=0.01)
    s = Scheduler(plan, resolve_config("fifo"), backend, order=None, leader=True,
                  on_chunk_done=lambda c: None)
    for key in (3, 7, 0, 5, 1, 2, 6, 4):
        s.tensor_ready(key)
    s.wait_steps(1, timeout_s=10)
    s.close()
    assert [plan.chunks[c].layer for c in backend.started] == [3, 7, 0, 5, 1, 2, 6, 4]


def test_credit_bounds_bytes_in_flight():
    plan = make_plan(make_tasks(), partition_bytes=4096)
    in_flight, peak = [0], [0]
    lock = threading.Lock()

    class Recorder(NullBackend):
        def start(self, chunk, on_done):
            with lock:
                in_flight[0] += chunk.nbytes
                peak[0] = max(peak[0], in_flight[0])

            def finish():
                with lock:
                    in_flight[0] -= chunk.nbytes
                on_done(None)
            threading.Timer(0.002, finish).start()

    config = resolve_config("bytescheduler", partition_bytes=4096, credit_bytes=8192)
    s = Scheduler(plan, config, Recorder(), order=None, leader=True, on_chunk_done=lambda c: None)
    for key in reversed(range(len(SIZES))):
        s.tensor_ready(key)
    s.wait_steps(1, timeout_s=10)
    s.close()
    assert peak[0] <= 8192 + 4096  # overshoot: credit plus one partition at most


def test_follower_times_out_with_a_clear_error_when_a_gradient_never_comes():
    plan, collective, ranks, _ = build_ranks(2, "fifo", timeout_s=0.5)
    for key in range(len(SIZES)):
        ranks[0].tensor_ready(key)
    ranks[1].tensor_ready(0)  # rank 1 produces only one gradient
    with pytest.raises(CommFailed, match=r"\[rank 1\] the leader started chunk 1 \(layer1.weight\)"
                                         r" but its gradient was not ready here after 0.5 s"):
        ranks[1].wait_steps(1, timeout_s=10)
    with pytest.raises(CommFailed, match=r"step 0 not finished after 0.3 s"):
        ranks[0].wait_steps(1, timeout_s=0.3)
    for s in ranks:
        s.close(timeout_s=2)


def test_backend_failure_is_reported_with_the_tensor_names():
    class Broken(NullBackend):
        def start(self, chunk, on_done):
            on_done(ConnectionResetError("peer 1 closed the connection"))

    plan = make_plan(make_tasks())
    s = Scheduler(plan, resolve_config("priority"), Broken(), order=None, leader=True,
                  on_chunk_done=lambda c: None)
    s.tensor_ready(2)
    with pytest.raises(CommFailed, match=r"chunk 2 \(layer2.weight\) failed: "
                                         r"ConnectionResetError: peer 1 closed"):
        s.wait_steps(1, timeout_s=5)
    with pytest.raises(CommFailed):
        s.tensor_ready(3)
    s.close(timeout_s=2)


def test_issue_history_is_bounded():
    plan = make_plan(make_tasks())
    s = Scheduler(plan, resolve_config("fifo"), NullBackend(), order=None, leader=True,
                  on_chunk_done=lambda c: None)
    for step in range(70):
        for key in range(len(SIZES)):
            s.tensor_ready(key)
        s.wait_steps(step + 1, timeout_s=10)
    s.close()
    assert s.issued_total == 70 * len(plan.chunks)
    assert len(s.issued) == 64 * len(plan.chunks)
