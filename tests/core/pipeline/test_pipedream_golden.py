"""`--mode pipedream` against PipeDream's own optimizer: every answer it gave on its 14 shipped
profiles, kept in tests/data/pipedream_golden.json by scripts/pipedream_golden.py (which runs
PipeDream's `optimizer_graph_hierarchical.py` unmodified, outside the project; each record holds
its command).

PipeDream minimises the slowest stage; when several plans reach that minimum, which one it
prints depends on the iteration order of a Python set of its state objects, so the stages are
compared where they can be and the time per minibatch always (the issue's criterion: the same
stages and replication, or the same time where PipeDream's set order breaks a tie)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from legato.core.pipeline import LayerProfile, plan
from legato.core.pipeline.topology import Level, Topology

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = json.loads((ROOT / "tests" / "data" / "pipedream_golden.json").read_text())
PROFILES = ROOT.parent / "shared" / "data" / "pipedream-profiles"
if not PROFILES.is_dir():
    PROFILES = Path("/work/shared/data/pipedream-profiles")
SOLVED = [r for r in GOLDEN["records"] if r.get("time_per_stage_s") is not None]
UNSOLVED = [r for r in GOLDEN["records"] if r.get("time_per_stage_s") is None]


def _profile(name: str) -> LayerProfile:
    path = PROFILES / name / "graph.txt"
    if not path.is_file():
        pytest.skip(f"PipeDream profile {path} is not on this machine (../shared/data)")
    return LayerProfile.from_pipedream(path)


def _topology(record: dict) -> Topology:
    return Topology(tuple(Level(n, b) for n, b in zip(record["n"], record["b"])))


def _check_partition(profile: LayerProfile, result, workers: int) -> None:
    seen = [x for s in result.stages for x in s.nodes]
    assert sorted(seen) == sorted(n.id for n in profile.nodes)
    assert sorted(r for s in result.stages for r in s.ranks) == list(range(workers))
    stage_of = result.stage_of
    assert all(stage_of[a] <= stage_of[b] for a, b in profile.edges)


def _id(record: dict) -> str:
    return f"{record['profile']}-" + "x".join(map(str, record["n"]))


def test_the_golden_data_is_what_the_issue_asks_for():
    """14 profiles x (2, 4, 8, 16 workers at 1 GB/s, and 4x4 at 10 GB/s inside a machine and
    1.25 GB/s between machines), each run or recorded as unsolvable with PipeDream's error."""
    assert GOLDEN["pipedream_commit"] and "unmodified" in GOLDEN["source"]
    configs = {(r["profile"], tuple(r["n"])) for r in GOLDEN["records"]}
    assert len({p for p, _ in configs}) == 14
    assert {n for _, n in configs} >= {(2,), (4,), (8,), (16,)}
    assert all(r["command"].startswith("PYTHONHASHSEED=0 python optimizer_graph_hierarchical.py")
               for r in GOLDEN["records"] if not r.get("error", "").startswith("not run"))
    assert all("error" in r for r in UNSOLVED)
    assert len(SOLVED) >= 44


@pytest.mark.parametrize("record", SOLVED, ids=_id)
def test_pipedream_mode_gives_pipedreams_time_per_minibatch(record):
    profile = _profile(record["profile"])
    result = plan(profile, _topology(record), mode="pipedream", activation_compression_ratio=1)
    _check_partition(profile, result, result.topology.workers)
    assert result.time_per_minibatch_s == pytest.approx(record["time_per_stage_s"], rel=1e-6)
    if len(record["n"]) == 1:
        # PipeDream's data-parallel baseline is the same arithmetic: single-machine time equal
        assert sum(s.compute_s for s in result.stages) == pytest.approx(
            record["single_machine_s"], rel=1e-9)


def test_most_single_level_answers_are_the_same_stages_not_only_the_same_time():
    """Where PipeDream's tie-break does not decide, the plan is the same: the per-stage compute
    times and replication factors it prints (its `levels`) equal legato's."""
    same = total = 0
    for record in SOLVED:
        if len(record["n"]) > 1 or not (PROFILES / record["profile"]).is_dir():
            continue
        result = plan(_profile(record["profile"]), record["n"][0], bandwidth=record["b"][0],
                      mode="pipedream", activation_compression_ratio=1)
        theirs = [(round(t, 9), m) for _, _, t, m in record["levels"][0]]
        mine = [(round(s.compute_s, 9), s.replicas) for s in result.stages]
        total += 1
        same += mine == theirs
    if not total:
        pytest.skip("the PipeDream profiles are not on this machine")
    assert same >= 0.75 * total, (same, total)   # 35 of 44 when written; the rest are ties


@pytest.mark.parametrize("record", [r for r in UNSOLVED if not r["error"].startswith("not run")],
                         ids=_id)
def test_legato_plans_what_pipedream_cannot(record):
    """Inception-v3 (PipeDream: MemoryError under a 6 GiB cap), the NASNets and gnmt_large on
    4x4 (no answer within the time limit): the plan is a valid partition over a bounded state
    space, and says so."""
    profile = _profile(record["profile"])
    for topology in ((2, 16) if len(record["n"]) == 1 else (_topology(record),)):
        result = plan(profile, topology, bandwidth=1e9, mode="pipedream",
                      activation_compression_ratio=1)
        _check_partition(profile, result, result.topology.workers)
        assert result.state_space in ("linearized", "coarsened")
        assert any("antichain DAG" in n for n in result.notes)
        assert 0 < result.time_per_minibatch_s <= result.dp_time_s * (1 + 1e-9)
