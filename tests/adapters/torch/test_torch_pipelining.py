"""legato's plans on torch.distributed.pipelining (real gloo jobs: the same losses as legato's own
PipelineTrainer on the same stages and microbatches), and torch's schedules read from torch's CSV
into legato's IR, verified and timed by legato's simulator."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("torch.distributed.pipelining", reason="torch has no pipelining module")

from legato.adapters.torch import read_torch_schedule  # noqa: E402
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.pipeline import StageCost, simulate, verify  # noqa: E402
from legato.core.pipeline.schedules import interleaved_1f1b  # noqa: E402
from legato.launch import run_torch_job  # noqa: E402

WORKERS = str(Path(__file__).parent / "_pipeline_workers.py")
S2 = [["fc1", "act1", "bn"], ["fc2", "drop", "act2", "fc3", "fc4"]]
S4 = [["fc1"], ["act1", "bn"], ["fc2", "drop", "act2"], ["fc3", "fc4"]]
EQUAL = StageCost(1.0, 2.0, backward_input_s=1.0, backward_weight_s=1.0)
_GPT = ["wte", "wpe", "add", *(f"h.{b}.{x}" for b in (0, 1) for x in (
    "ln_1", "attn.c_attn", "attn.split", "attn.view", "attn.view#2", "attn.view#3",
    "attn.matmul", "attn.mul", "attn.masked_fill", "attn.matmul#2", "attn.view#4",
    "attn.c_proj", "add", "ln_2", "mlp.0", "mlp.1", "mlp.2", "add#2")), "ln_f", "lm_head"]
EXPORTED = ["wte", "wpe", "add", *(f"h.{b}.{x}" for b in (0, 1) for x in (
    "ln_1", "attn.c_attn", "attn.c_proj", "add", "ln_2", "mlp.0", "mlp.2", "add#2")), "ln_f",
    "lm_head"]
GPT2 = [_GPT[:21], _GPT[21:]]                            # cut between the two blocks
GPT4 = [_GPT[:3], _GPT[3:21], _GPT[21:39], _GPT[39:]]    # embeddings, block, block, head


def _losses(result, ranks: int, label: str, who: str) -> list[float]:
    for r in range(ranks):
        for ln in result.rank(r).stdout.splitlines():
            if f": {label} {who} losses " in ln:
                return ast.literal_eval(ln.split(" losses ", 1)[1])
    raise AssertionError(f"no {who} losses for {label}:\n{result.summary()}")


def _check_same_training(result, ranks: int, cases: list[dict]) -> None:
    for case in cases:
        ours = _losses(result, ranks, case["label"], "legato")
        theirs = _losses(result, ranks, case["label"], "torch")
        assert ours[0] == theirs[0], case["label"]          # the same weights, the same forward
        assert theirs == pytest.approx(ours, rel=1e-6), case["label"]
        diffs = [float(ln.rsplit(" ", 1)[1]) for r in range(ranks)
                 for ln in result.rank(r).stdout.splitlines()
                 if f": {case['label']} stages" in ln]
        assert len(diffs) == ranks and max(diffs) <= 1e-6, (case["label"], diffs)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_torch_schedules_train_as_pipeline_trainer_does(tmp_path):
    """1F1B, GPipe, interleaved 1F1B, torch's interleaved zero bubble and its V-shaped zero
    bubble (stages 0 and 3 on rank 0) over a legato split: 3 SGD-momentum steps give the same
    losses as PipelineTrainer, and the same weights (torch divides the summed gradient by m
    where legato divides each microbatch's loss: equal to 1e-6)."""
    cases = [
        {"label": "1F1B", "stages": S2, "legato": "1f1b", "torch": "1F1B", "m": 4},
        {"label": "GPipe", "stages": S2, "legato": "gpipe", "torch": "GPipe", "m": 3},
        {"label": "Interleaved1F1B", "stages": [2, 2, 2, 2], "legato": "interleaved-1f1b",
         "torch": "Interleaved1F1B", "m": 4, "options": {"virtual_stages": 2}},
        {"label": "InterleavedZeroBubble", "stages": [2, 2, 2, 2],
         "legato": "interleaved-1f1b", "torch": "InterleavedZeroBubble", "m": 4,
         "options": {"virtual_stages": 2}},
        {"label": "ZBVZeroBubble", "stages": [2, 2, 2, 2], "legato": "interleaved-1f1b",
         "torch": "ZBVZeroBubble", "m": 4, "options": {"virtual_stages": 2}},
        # nanoGPT's tied embedding and head in the first and last stage: on two ranks (1F1B);
        # on one rank for torch's V shape (stages 0 and 3 on rank 0) and on two for legato's
        # interleaving (stage 0 on rank 0, stage 3 on rank 1)
        {"label": "tied-1F1B", "model": "gpt_tied", "stages": GPT2, "legato": "1f1b",
         "torch": "1F1B", "m": 4},
        {"label": "tied-ZBV", "model": "gpt_tied", "stages": GPT4, "legato": "interleaved-1f1b",
         "torch": "ZBVZeroBubble", "m": 4, "options": {"virtual_stages": 2}},
        # captured by torch.export (as torch's own pipeline() captures): its layer ids
        {"label": "export-tied-1F1B", "model": "gpt_tied", "capture": "export",
         "stages": [EXPORTED[:11], EXPORTED[11:]], "legato": "1f1b", "torch": "1F1B", "m": 4},
    ]
    result = run_torch_job(f"{WORKERS}:torch_runtime", 2, args=[cases, 3, str(tmp_path)],
                           timeout_s=250)
    _check_same_training(result, 2, cases)
    # torch's own multi-stage schedules, read from the CSV torch wrote, in legato's verifier
    # and simulator: torch's interleaved 1F1B has Megatron's bubble (p-1)/(vm+p-1), as
    # legato's generator does; its zero-bubble schedules have less
    bubbles = {}
    for label in ("Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"):
        sched = read_torch_schedule(tmp_path / f"{label}.csv", name=label)
        assert sched.meta["communication"] == "torch's"
        verify(sched)
        bubbles[label] = simulate(sched, EQUAL).bubble_fraction
    ours = simulate(interleaved_1f1b(2, 4, virtual_stages=2), EQUAL).bubble_fraction
    assert bubbles["Interleaved1F1B"] == pytest.approx((2 - 1) / (2 * 4 + 2 - 1)) == ours
    assert bubbles["InterleavedZeroBubble"] < ours and bubbles["ZBVZeroBubble"] < ours


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_four_ranks_torch_schedules_train_as_pipeline_trainer_does(tmp_path):
    cases = [
        {"label": "1F1B-4", "stages": S4, "legato": "1f1b", "torch": "1F1B", "m": 4},
        {"label": "Interleaved1F1B-8-on-4", "stages": [1] * 8, "legato": "interleaved-1f1b",
         "torch": "Interleaved1F1B", "m": 4, "options": {"virtual_stages": 2}},
    ]
    result = run_torch_job(f"{WORKERS}:torch_runtime", 4, args=[cases, 2, str(tmp_path)],
                           timeout_s=250)
    _check_same_training(result, 4, cases)
    sched = read_torch_schedule(tmp_path / "Interleaved1F1B-8-on-4.csv")
    assert [r for (r,) in sched.stage_ranks] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert simulate(sched, EQUAL).bubble_fraction == pytest.approx(3 / (2 * 4 + 3))


def test_reading_torch_csv_compute_only_and_its_errors(tmp_path):
    """torch's compute-only form (its `_dump_csv` of `pipeline_order`, idle steps empty) gets
    legato's sends and receives; torch's OVERLAP_F_B cells run their parts in order."""
    rows = ["0F0,0F1,,0B0,0F2,0B1,,0B2", ",1F0,1B0,1F1,1B1,1F2,1B2,"]
    sched = read_torch_schedule("\n".join(rows) + "\n")
    assert sched.stage_ranks == [(0,), (1,)] and sched.num_microbatches == 3
    assert sched.meta["communication"] == "legato's"
    assert [str(a) for a in sched.actions[1][:3]] == ["1RECV_F0@0", "1F0", "1B0"]
    assert verify(sched).peak_in_flight[(0, 0)] == 2
    assert simulate(sched, StageCost(1.0, 2.0)).makespan_s == pytest.approx(12.0)
    overlap = read_torch_schedule("0F0,0F1,(0F2;0B0)OVERLAP_F_B,0B1,0B2\n"
                                  ",1F0,1B0,1F1,1B1,1F2,1B2\n")
    assert [str(a) for a in overlap.actions[0] if a.kind.is_compute][2:4] == ["0F2", "0B0"]
    (tmp_path / "bad.csv").write_text("0F0,0X1\n")
    with pytest.raises(ConfigError, match=r"row 1, column 2: '0X1' is not a torch pipeline "
                                          r"action"):
        read_torch_schedule(tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="stage 0 is computed on ranks 0 and 1"):
        read_torch_schedule("0F0,0B0\n0F1,0B1\n")
    with pytest.raises(ConfigError, match="holds no forward or backward"):
        read_torch_schedule(",\n")
