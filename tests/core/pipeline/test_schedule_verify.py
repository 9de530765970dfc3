"""Static verifier: every generated schedule verifies; in-flight microbatches and weight versions
match their closed forms; broken hand-written schedules fail with the rank, step and action."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from legato.core.pipeline.ir import ActionKind, Schedule, ScheduleError
from legato.core.pipeline.schedules import (
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    pipedream,
    pipedream_2bw,
)
from legato.core.pipeline.verify import DeadlockError, verify

K = ActionKind


def _straight_and_replicated():
    for p in range(1, 5):
        yield [1] * p
    yield from ([2, 1], [1, 2], [3, 1], [2, 2], [3, 1, 2], [1, 3, 1], [2, 1, 1, 2])


def generated():
    """Many (generator, p, m, v, replicas, split) combinations, each a valid schedule."""
    for reps, m, split in itertools.product(_straight_and_replicated(), (1, 2, 3, 5, 6, 12),
                                            (False, True)):
        p = len(reps)
        if m < max(reps):
            continue
        yield gpipe(p, m, replicas=reps, split_backward=split)
        yield one_f_one_b(p, m, replicas=reps, split_backward=split)
        if m % math.lcm(*reps) == 0:
            yield pipedream(p, m, replicas=reps, split_backward=split)
            if max(reps) == 1:
                yield pipedream(p, m, vertical_sync=True, split_backward=split)
        least = max(r * math.ceil(sum(reps[s:]) / r) for s, r in enumerate(reps))
        if m % math.lcm(*reps) == 0 and m >= least:
            yield pipedream_2bw(p, m, num_steps=2, replicas=reps, split_backward=split)
    for p, v, groups, split in itertools.product((1, 2, 3, 4), (1, 2, 3), (1, 2, 3),
                                                 (False, True)):
        yield interleaved_1f1b(p, p * groups, virtual_stages=v, split_backward=split)


def test_every_generated_schedule_verifies():
    count = 0
    for schedule in generated():
        report = verify(schedule)
        count += 1
        if count % 25 == 0:  # verified schedules stay valid on other rank numbers
            shift = {r: r + 7 for r in schedule.ranks}
            assert verify(schedule.relabel(shift)).versions == report.versions
        # every microbatch forwarded and backwarded once on every stage
        assert set(report.versions) == {(s, i) for s in range(schedule.num_stages)
                                        for i in range(schedule.num_microbatches)}
        # the order is a complete execution that keeps each rank's program order
        assert len(report.order) == sum(len(a) for a in schedule.actions.values())
        for rank in schedule.ranks:
            assert [t for r, t in report.order if r == rank] == list(
                range(len(schedule.actions[rank])))
        for (_, stage), n in report.steps.items():
            if schedule.name == "pipedream":  # a step per backward of each replica
                assert n == schedule.num_microbatches // schedule.replicas(stage)
            else:
                assert n == schedule.meta["num_steps"]
    assert count > 300


def _random_run(schedule: Schedule, rng: random.Random) -> dict[int, int]:
    """An independent executor: at each point run one enabled action of a random rank."""
    pc = {r: 0 for r in schedule.ranks}
    sent, arrived = set(), {}

    def enabled(rank):
        a = schedule.actions[rank][pc[rank]]
        if a.kind is K.RECV_F:
            return (a.peer, rank, "F", a.stage - 1, a.microbatch) in sent
        if a.kind is K.RECV_B:
            return (a.peer, rank, "B", a.stage + 1, a.microbatch) in sent
        if a.kind is K.ALLREDUCE:
            arrived.setdefault((a.stage, a.microbatch), set()).add(rank)
            return len(arrived[(a.stage, a.microbatch)]) == schedule.replicas(a.stage)
        return True

    while True:
        ready = [r for r in schedule.ranks if pc[r] < len(schedule.actions[r]) and enabled(r)]
        if not ready:
            return pc
        rank = rng.choice(ready)
        a = schedule.actions[rank][pc[rank]]
        if a.kind.is_send:
            sent.add((rank, a.peer, a.kind.value[-1], a.stage, a.microbatch))
        pc[rank] += 1


def test_random_interleavings_agree_with_the_verifier():
    """[Note: why one greedy run proves deadlock freedom] checked empirically."""
    rng = random.Random(0)
    for schedule in [one_f_one_b(4, 8), pipedream(2, 6, replicas=[3, 1]),
                     interleaved_1f1b(3, 6, virtual_stages=2), pipedream_2bw(3, 3)]:
        for _ in range(20):
            pc = _random_run(schedule, rng)
            assert all(pc[r] == len(schedule.actions[r]) for r in schedule.ranks)
    bad = _cyclic()
    finals = {tuple(sorted(_random_run(bad, rng).items())) for _ in range(20)}
    assert finals == {((0, 1), (1, 0))}  # rank 0 at 0RECV_B0@1, rank 1 at 1RECV_F0@0


@pytest.mark.parametrize("p, m", [(1, 1), (2, 1), (3, 5), (4, 2), (4, 4), (4, 9), (6, 12)])
def test_in_flight_closed_forms_1f1b_vs_gpipe(p, m):
    flush = verify(one_f_one_b(p, m)).by_stage(verify(one_f_one_b(p, m)).peak_in_flight)
    assert flush == {s: min(p - s, m) for s in range(p)}
    fill_drain = verify(gpipe(p, m))
    assert fill_drain.by_stage(fill_drain.peak_in_flight) == {s: m for s in range(p)}
    assert all(v == 1 for v in fill_drain.peak_weight_versions.values())


def test_in_flight_with_split_backward_counts_until_weight_grad():
    report = verify(one_f_one_b(4, 8, split_backward=True))
    assert report.by_stage(report.peak_in_flight) == {0: 4, 1: 3, 2: 2, 3: 1}


@pytest.mark.parametrize("p, m", [(1, 3), (2, 3), (3, 5), (4, 7), (4, 16), (5, 20)])
def test_pipedream_holds_p_minus_s_weight_versions(p, m):
    report = verify(pipedream(p, m))
    assert report.by_stage(report.peak_weight_versions) == {s: p - s for s in range(p)}
    # stage s runs microbatch i with the weights after the steps of microbatches < i-(p-s)+1
    assert report.versions == {(s, i): max(0, i - (p - s) + 1) for s in range(p)
                               for i in range(m)}


def test_pipedream_short_runs_hold_at_most_p_minus_s_versions():
    for p, m in itertools.product(range(1, 6), range(1, 9)):
        report = verify(pipedream(p, m))
        assert all(report.by_stage(report.peak_weight_versions)[s] <= p - s for s in range(p))


def test_vertical_sync_uses_stage_zeros_version_everywhere():
    p, m = 4, 12
    report = verify(pipedream(p, m, vertical_sync=True))
    for s, i in report.versions:
        assert report.versions[(s, i)] == report.versions[(0, i)] == max(0, i - p + 1)
    # later stages keep the versions that microbatches still in the pipe entered with
    assert report.by_stage(report.peak_weight_versions) == {s: p for s in range(p)}


@pytest.mark.parametrize("p, m, replicas", [(1, 1, None), (2, 2, None), (4, 4, None),
                                             (4, 6, None), (3, 8, None), (2, 4, [2, 1]),
                                             (3, 6, [1, 2, 1])])
def test_2bw_holds_two_weight_versions(p, m, replicas):
    report = verify(pipedream_2bw(p, m, num_steps=3, replicas=replicas))
    assert set(report.peak_weight_versions.values()) == {2}
    assert report.versions == {(s, i): max(0, i // m - 1) for s in range(p)
                               for i in range(3 * m)}
    assert set(report.steps.values()) == {3}


def test_interleaved_in_flight_and_steps():
    report = verify(interleaved_1f1b(4, 8, virtual_stages=2))
    assert report.steps == {(vs % 4, vs): 1 for vs in range(8)}
    # rank 0 holds the most: (v - 1) p + 2 (p - 1) warm-up forwards, plus one
    assert report.peak_in_flight_rank == {0: 11, 1: 9, 2: 7, 3: 5}


# -- broken schedules ---------------------------------------------------------------------------
def _two(actions: dict[int, list[str]], m: int = 1) -> Schedule:
    return Schedule("hand", actions, [(0,), (1,)], m)


def _cyclic() -> Schedule:
    """Rank 0 waits for a gradient before sending its activation; rank 1 waits for that."""
    return _two({0: ["0F0", "0RECV_B0@1", "0SEND_F0@1", "0B0"],
                 1: ["1RECV_F0@0", "1F0", "1B0", "1SEND_B0@0"]})


def test_cyclic_wait_reports_blocked_ranks_and_the_cycle():
    with pytest.raises(DeadlockError) as err:
        verify(_cyclic())
    e = err.value
    assert e.cycle == [0, 1, 0]
    assert set(e.blocked) == {0, 1}
    assert "rank 0 step 1 (0RECV_B0@1) waits for rank 1 to issue 1SEND_B0@0" in str(e)
    assert "rank 1 step 0 (1RECV_F0@0) waits for rank 0 to issue 0SEND_F0@1" in str(e)
    assert "cycle of waits: rank 0 -> rank 1 -> rank 0" in str(e)
    assert ">0RECV_B0@1<" in str(e) and "BLOCKED HERE" in str(e)
    assert (e.rank, e.step, str(e.action)) == (0, 1, "0RECV_B0@1")


def test_unmatched_receive_names_the_missing_send():
    bad = _two({0: ["0F0", "0RECV_B0@1", "0B0"],
                1: ["1RECV_F0@0", "1F0", "1B0", "1SEND_B0@0"]})
    with pytest.raises(ScheduleError, match=r"rank 1 step 0 \(1RECV_F0@0\): unmatched "
                       r"receive: no rank issues the matching 0SEND_F0@1 on rank 0") as err:
        verify(bad)
    assert err.value.rank == 1 and err.value.step == 0 and "ERROR HERE" in str(err.value)


def test_unmatched_send():
    bad = _two({0: ["0F0", "0SEND_F0@1", "0SEND_F0@1"], 1: ["1RECV_F0@0", "1F0"]})
    with pytest.raises(ScheduleError, match="sent again"):
        verify(bad)
    bad = _two({0: ["0F0", "0SEND_F0@1", "0B0"], 1: []})
    with pytest.raises(ScheduleError, match=r"unmatched send: rank 1 never receives it; add "
                       r"1RECV_F0@0 on rank 1"):
        verify(bad)


def test_missing_backward_names_stage_and_microbatch():
    s = one_f_one_b(2, 2)
    for rank, gone in ((0, {"0RECV_B1@1", "0B1"}), (1, {"1B1", "1SEND_B1@0"})):
        s.actions[rank] = [a for a in s.actions[rank] if str(a) not in gone]
    with pytest.raises(ScheduleError, match=r"missing backward: 0F1 runs here but no rank "
                       r"runs 0B1 \(or 0I1 and 0W1\); add it on rank 0") as err:
        verify(s)
    assert (err.value.rank, err.value.step) == (0, 2)
    one_stage = Schedule("hand", {0: ["0F0", "0F1", "0B0", "0STEP0"]}, [(0,)], 2)
    with pytest.raises(ScheduleError, match=r"missing backward: 0F1"):
        verify(one_stage)
    with pytest.raises(ScheduleError, match=r"stage 0 never runs microbatch 1"):
        verify(Schedule("hand", {0: ["0F0", "0B0"]}, [(0,)], 2))


def test_malformed_action_in_a_hand_written_schedule():
    with pytest.raises(ScheduleError, match=r"malformed action '1F0@'"):
        _two({0: ["0F0"], 1: ["1F0@"]})


@pytest.mark.parametrize("actions, match", [
    ({0: ["0SEND_F0@1", "0F0", "0B0"], 1: ["1RECV_F0@0", "1F0", "1B0"]},
     r"rank 0 step 0 \(0SEND_F0@1\): SEND_F before 0F0"),
    ({0: ["0F0", "0SEND_F0@1", "0RECV_B0@1", "0B0"],
      1: ["1F0", "1RECV_F0@0", "1B0", "1SEND_B0@0"]},
     r"rank 1 step 0 \(1F0\): F runs before its input arrives"),
    ({0: ["0F0", "0SEND_F0@1", "0RECV_B0@1", "0B0"],
      1: ["1RECV_F0@0", "1B0", "1SEND_B0@0", "1F0"]},
     r"rank 1 step 1 \(1B0\): B runs before 1F0 on this rank"),
    ({0: ["0F0", "0SEND_F0@1", "0B0"], 1: ["1RECV_F0@0", "1F0", "1B0"]},
     (r"rank 0 step 2 \(0B0\): B runs before its output gradient arrives; put "
      r"0RECV_B0@<rank of stage 1> before it")),
    ({0: ["1F0"], 1: ["0F0"]}, r"rank 0 does not host stage 1"),
    ({0: ["0F0", "0SEND_F0@0", "0B0"], 1: []}, r"peer rank 0 does not host stage 1"),
    ({0: ["0F0", "0SEND_B0@1"], 1: []}, r"stage 0 has no neighbour stage -1"),
    ({0: ["0F3"], 1: []}, r"microbatch 3 is out of range"),
    ({0: ["0F0", "0F0"], 1: []}, r"forwarded on stage 0 twice"),
    ({0: ["0F0", "0SEND_F0@1", "0RECV_B0@1", "0W0"], 1: ["1RECV_F0@0", "1F0", "1I0",
                                                         "1SEND_B0@0", "1W0"]},
     r"W runs before 0I0"),
    ({0: ["0F0", "0SEND_F0@1", "0RECV_B0@1", "0I0"], 1: ["1RECV_F0@0", "1F0", "1I0",
                                                         "1SEND_B0@0", "1W0"]},
     r"0I0 has no 0W0 after it"),
    ({0: ["0F0", "0STEP1"], 1: []}, r"STEP round 1 out of order"),
    ({0: ["0F0v1"], 1: []}, r"F asks for weight version 1 but stage 0 has taken only 0"),
])
def test_broken_dependencies_are_named(actions, match):
    with pytest.raises(ScheduleError, match=match) as err:
        verify(_two(actions))
    assert err.value.rank is not None and "ERROR HERE" in str(err.value)


def test_async_schedule_without_stashing_is_caught():
    s = pipedream(2, 4)
    for rank in s.ranks:
        s.actions[rank] = [a for a in s.actions[rank]
                           if a.kind not in (K.STASH, K.RESTORE)]
    with pytest.raises(ScheduleError, match=r"rank 0 step 10 \(0B1\): the forward of "
                       r"microbatch 1 used weight version 0 but this backward uses version 1 "
                       r".* stash the weights: 0STASH1 after the F and 0RESTORE1 before"):
        verify(s)


def test_stash_without_restore_is_caught():
    s = pipedream(2, 4)
    s.actions[1] = [a for a in s.actions[1] if str(a) != "1RESTORE2"]
    with pytest.raises(ScheduleError, match=r"1STASH2 has no 1RESTORE2 before this backward"):
        verify(s)


def test_replicated_step_needs_its_all_reduce():
    s = gpipe(2, 4, replicas=[2, 1])
    s.actions[0] = [a for a in s.actions[0] if a.kind is not K.ALLREDUCE]
    with pytest.raises(ScheduleError, match=r"replicated \(\(0, 1\)\) but runs STEP 0 without "
                       r"0ALLREDUCE0"):
        verify(s)


def test_all_reduce_round_missing_on_one_replica_deadlocks():
    s = pipedream(2, 4, replicas=[2, 1])
    s.actions[1] = [a for a in s.actions[1] if str(a) not in ("0ALLREDUCE1", "0STEP1")]
    with pytest.raises(DeadlockError) as err:
        verify(s)
    assert "waits for rank(s) [1] to reach 0ALLREDUCE1" in str(err.value)
    assert "rank(s) [1] finished without 0ALLREDUCE1" in str(err.value)
    assert err.value.cycle == []


def test_all_reduce_against_send_order_is_a_cycle():
    """Replica 1 enters the all-reduce before sending the activation the last stage waits for."""
    s = Schedule("hand", {0: ["0F0", "0SEND_F0@2", "0RECV_B0@2", "0B0", "0ALLREDUCE0",
                              "0STEP0"],
                          1: ["0ALLREDUCE0", "0F1", "0SEND_F1@2", "0RECV_B1@2", "0B1", "0STEP0"],
                          2: ["1RECV_F1@1", "1F1", "1B1", "1SEND_B1@1", "1RECV_F0@0", "1F0",
                              "1B0", "1SEND_B0@0", "1STEP0"]},
                 [(0, 1), (2,)], 2)
    with pytest.raises(DeadlockError) as err:
        verify(s)
    # rank 0 waits for rank 2's gradient, rank 2 for rank 1's activation, and rank 1 for rank
    # 0 in the all-reduce
    assert err.value.cycle == [0, 2, 1, 0]
    assert "cycle of waits: rank 0 -> rank 2 -> rank 1 -> rank 0" in str(err.value)
