"""PipelineTrainer: exactness against single-process references on real gloo jobs, weight
versions, timeline, checkpoints, dead peers, and clear errors for bad input."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _pipeline_workers as W  # noqa: E402
from legato.adapters.torch import (  # noqa: E402
    PipelineTrainer,
    layer_ids,
    profile_pipeline,
    split_model,
)
from legato.adapters.torch._pipeline_exec import fifo_mismatch  # noqa: E402
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.pipeline import Schedule, one_f_one_b, plan  # noqa: E402
from legato.launch import free_port, run_torch_job  # noqa: E402

WORKERS = str(Path(__file__).parent / "_pipeline_workers.py")
S2 = [["fc1", "act1", "bn"], ["fc2", "drop", "act2", "fc3", "fc4"]]
S3 = [["fc1", "act1"], ["bn", "fc2", "drop"], ["act2", "fc3", "fc4"]]
GPT_IDS = ["wte", "wpe", "add", *(f"h.{b}.{x}" for b in (0, 1) for x in (
    "ln_1", "attn.c_attn", "attn.split", "attn.view", "attn.view#2", "attn.view#3",
    "attn.matmul", "attn.mul", "attn.masked_fill", "attn.matmul#2", "attn.view#4",
    "attn.c_proj", "add", "ln_2", "mlp.0", "mlp.1", "mlp.2", "add#2")), "ln_f", "lm_head"]
GPT2 = [GPT_IDS[:21], GPT_IDS[21:]]                      # cut between the two blocks
GPT3 = [GPT_IDS[:21], GPT_IDS[21:39], GPT_IDS[39:]]      # the tied head alone on the last rank


def lines(result, ranks: int, text: str) -> list[str]:
    out = []
    for r in range(ranks):
        found = [ln for ln in result.rank(r).stdout.splitlines() if text in ln]
        assert found, f"rank {r} printed no line with {text!r}:\n{result.rank(r).stdout}"
        out += found
    return out


# -- exactness on real jobs ------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_sync_schedules_are_bit_identical_to_single_process_on_two_ranks(tmp_path):
    """GPipe, 1F1B, 1F1B with split backward (I/W), ZB-H1, an FX model with a skip connection (two
    tensors cross the cut), interleaved 1F1B (4 virtual stages on 2 ranks) and a Plan from the
    planner: after 3 SGD-momentum steps every parameter and BatchNorm buffer, and the loss,
    equal a single-process run of the same stage modules on the same microbatches (loss / m,
    accumulation in microbatch order, the same dropout seeds). Every rank's timeline lists its
    actions in order and covers the simulator's cells."""
    model = W.residual()
    prof = profile_pipeline(model, W.batch(0)[0], warmup=0, repeats=1)
    planned = plan(prof, 2, straight=True)
    assert len(planned.stages) == 2
    plan_path = str(planned.save(tmp_path / "plan.json"))
    # ints from x.size() flow inside the attention: the planner keeps them in one stage
    attn_prof = profile_pipeline(W.attn(), W.batch(0)[0], warmup=0, repeats=1)
    attn_plan = plan(attn_prof, 2, straight=True)
    assert len(attn_plan.stages) == 2
    attn_path = str(attn_plan.save(tmp_path / "attn.json"))
    # nanoGPT as written: an assert and a branch on traced shapes, a mask buffer sliced by T
    gpt_plan = plan(profile_pipeline(W.gpt(), W.batch(0)[0], warmup=0, repeats=1), 2,
                    straight=True)
    gpt_path = str(gpt_plan.save(tmp_path / "gpt.json"))
    # nanoGPT's tied embedding and head: the sync objective may split them, and does here
    tied_prof = profile_pipeline(W.gpt_tied(), W.token_batch(0)[0], warmup=0, repeats=1)
    tied_plan = plan(tied_prof, 2, straight=True, objective="sync", microbatches=4)
    assert tied_plan.stage_of["wte"] == 0 and tied_plan.stage_of["lm_head"] == 1
    assert any("tied parameter wte.weight" in n for n in tied_plan.notes)
    tied_path = str(tied_plan.save(tmp_path / "tied.json"))
    cases = [
        {"label": "gpipe-2", "model": "mlp", "stages": S2, "schedule": "gpipe", "m": 3},
        {"label": "1f1b-2", "model": "mlp", "stages": S2, "schedule": "1f1b", "m": 4},
        {"label": "1f1b-split-2", "model": "mlp", "stages": S2, "schedule": "1f1b", "m": 4,
         "options": {"split_backward": True}},
        {"label": "fx-1f1b-2", "model": "residual", "stages": [["fc1", "fc2"],
                                                               ["drop", "fc3", "add", "head"]],
         "schedule": "1f1b", "m": 3},
        {"label": "interleaved-4-on-2", "model": "mlp", "stages": [2, 2, 2, 2],
         "schedule": "interleaved-1f1b", "m": 4, "options": {"virtual_stages": 2}},
        {"label": "planned-gpipe", "model": "residual", "plan": plan_path, "schedule": "gpipe",
         "m": 2},
        {"label": "zb-h1-2", "model": "mlp", "stages": S2, "schedule": "zb-h1", "m": 4},
        {"label": "planned-attn", "model": "attn", "plan": attn_path, "schedule": "1f1b",
         "m": 3},
        {"label": "planned-gpt", "model": "gpt", "plan": gpt_path, "schedule": "1f1b",
         "m": 4},
        {"label": "dict-output", "model": "dictout", "stages": [["a"], ["b", "head", "aux"]],
         "schedule": "1f1b", "m": 3},
        {"label": "lstm-layers", "model": "lstm",
         "stages": [["view", "emb", "rnn.layers.0"], ["rnn.layers.1", "rnn.layers.2", "head"]],
         "schedule": "1f1b", "m": 3},
        {"label": "planned-gpt-tied", "model": "gpt_tied", "plan": tied_path,
         "schedule": "1f1b", "m": 4, "unsplit": True},
        {"label": "tied-gpipe", "model": "gpt_tied", "stages": GPT2, "schedule": "gpipe",
         "m": 3, "unsplit": True},
        {"label": "tied-zb-h1", "model": "gpt_tied", "stages": GPT2, "schedule": "zb-h1",
         "m": 4, "unsplit": True},
    ]
    result = run_torch_job(f"{WORKERS}:sync_exact", 2, args=[cases, 3], timeout_s=150)
    for case in cases:
        lines(result, 2, f"{case['label']} bit-identical after 3 steps")


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_models_captured_by_torch_export_train_bit_identically_on_two_ranks(tmp_path):
    """capture='export' (torch.export, non-strict): nanoGPT with its tied head planned from an
    exported profile, a 3-layer LSTM split between its layers, a dict output, nanoGPT without
    the tie under ZB-H1, and a Python loop over the sequence that torch.fx cannot trace
    (capture='auto' falls back to export; its GRU cell is called three times, across the
    cut): after 3 steps every stage equals the single-process run of the same stages bit for
    bit, and plain training of the unsplit model to 1e-5."""
    prof = profile_pipeline(W.gpt_tied(), W.token_batch(0)[0], warmup=0, repeats=1,
                            capture="export")
    assert prof.meta["capture"] == "export" and not prof.meta.get("same_stage")
    tied_plan = plan(prof, 2, straight=True, objective="sync", microbatches=4)
    assert tied_plan.stage_of["wte"] != tied_plan.stage_of["lm_head"]
    tied_path = str(tied_plan.save(tmp_path / "tied.json"))
    gpt_plan = plan(profile_pipeline(W.gpt(), W.batch(0)[0], warmup=0, repeats=1,
                                     capture="export"), 2, straight=True)
    gpt_path = str(gpt_plan.save(tmp_path / "gpt.json"))
    cases = [
        {"label": "export-gpt-tied", "model": "gpt_tied", "plan": tied_path, "capture": "export",
         "schedule": "1f1b", "m": 4, "unsplit": True},
        {"label": "export-lstm", "model": "lstm", "capture": "export", "schedule": "1f1b",
         "stages": [["view", "emb", "rnn.layers.0"], ["rnn.layers.1", "rnn.layers.2", "head"]],
         "m": 3, "unsplit": True},
        {"label": "export-dict", "model": "dictout", "capture": "export", "schedule": "gpipe",
         "stages": [["a", "b"], ["head", "aux"]], "m": 3, "unsplit": True},
        {"label": "export-gpt-zb", "model": "gpt", "plan": gpt_path, "capture": "export",
         "schedule": "zb-h1", "m": 4, "unsplit": True},
        {"label": "auto-unrolled-loop", "model": "unrolled", "schedule": "1f1b",
         "stages": [["view", "emb", "cell"], ["cell#2", "cell#3", "head"]], "m": 3,
         "unsplit": True},
    ]
    result = run_torch_job(f"{WORKERS}:sync_exact", 2, args=[cases, 3], timeout_s=150)
    for case in cases:
        lines(result, 2, f"{case['label']} bit-identical after 3 steps")


def test_capture_choices_and_their_errors():
    """A loop over a traced length defeats torch.fx (plain and on the example): 'auto' falls
    back to torch.export and the profile says so; 'fx' refuses it naming FX; export specializes
    sizes, so no int crosses a layer there; bad values are clear errors."""
    x = W.batch(0)[0]
    assert profile_pipeline(W.unrolled(), x, warmup=0, repeats=1).meta["capture"] == "export"
    assert profile_pipeline(W.gpt(), x, warmup=0, repeats=1).meta["capture"] == "fx-example"
    assert profile_pipeline(W.residual(), x, warmup=0, repeats=1).meta["capture"] == "fx"
    assert layer_ids(W.unrolled(), x) == ["view", "emb", "cell", "cell#2", "cell#3", "head"]
    with pytest.raises(ConfigError, match="Unrolled is not an nn.Sequential and torch.fx cannot "
                                          "trace it"):
        layer_ids(W.unrolled(), x, capture="fx")
    with pytest.raises(ConfigError, match=r"capture='jit' is unknown; use one of \['auto', "
                                          r"'fx', 'export'\]"):
        layer_ids(W.residual(), x, capture="jit")
    with pytest.raises(ConfigError, match="capture='export' takes the model's positional "
                                          "arguments as tensors"):
        layer_ids(W.residual(), (x, 3), capture="export")
    with pytest.raises(ConfigError, match=r"torch.export cannot capture Untraceable \(.*\); see "
                                          r"torch.export's programming model"):
        layer_ids(Untraceable(), x, capture="export")


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_sync_schedules_are_bit_identical_on_three_ranks_with_replicas():
    """Three stages (an FX one passes the skip tensor through the middle stage), ZB-H1 (weight
    gradients deferred past later microbatches' input gradients), and a replicated stage:
    replicas [2, 1] and [1, 2] on 3 ranks, whose all-reduce sums the two replicas' accumulated
    gradients (two terms: exact). Where a tie's copies are on three ranks (two replicas of the
    first stage and the last stage), its all-reduce adds three terms in an order gloo's ring
    chooses per chunk, not the reference's (a + b) + c: equal within rounding there (a missing
    or doubled sum differs by about the learning rate times a gradient, 1e-3 or more)."""
    cases = [
        {"label": "tied-1f1b-3", "model": "gpt_tied", "stages": GPT3, "schedule": "1f1b",
         "m": 4, "unsplit": True},
        {"label": "tied-replicas-2-1", "model": "gpt_tied", "stages": GPT2, "replicas": [2, 1],
         "schedule": "1f1b", "m": 4, "unsplit": True, "exact": False},
        {"label": "gpipe-3", "model": "mlp", "stages": S3, "schedule": "gpipe", "m": 4},
        {"label": "1f1b-3", "model": "mlp", "stages": S3, "schedule": "1f1b", "m": 4},
        {"label": "zb-h1-3", "model": "mlp", "stages": S3, "schedule": "zb-h1", "m": 6},
        {"label": "fx-zb-h1-3", "model": "residual",
         "stages": [["fc1"], ["fc2", "drop", "fc3"], ["add", "head"]], "schedule": "zb-h1",
         "m": 3},
        {"label": "fx-1f1b-3", "model": "residual",
         "stages": [["fc1"], ["fc2", "drop", "fc3"], ["add", "head"]], "schedule": "1f1b",
         "m": 3},
        {"label": "1f1b-replicas-2-1", "model": "mlp", "stages": [["fc1", "act1"], S3[1] + S3[2]],
         "replicas": [2, 1], "schedule": "1f1b", "m": 4},
        {"label": "gpipe-replicas-1-2", "model": "mlp",
         "stages": [["fc1", "act1", "bn", "fc2"], ["drop", "act2", "fc3", "fc4"]],
         "replicas": [1, 2], "schedule": "gpipe", "m": 4},
    ]
    result = run_torch_job(f"{WORKERS}:sync_exact", 3, args=[cases, 3], timeout_s=150)
    for case in cases:
        said = "bit-identical" if case.get("exact", True) else "equal within rounding"
        lines(result, 3, f"{case['label']} {said} after 3 steps")


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_pipedream_stashing_matches_the_delayed_update_emulator():
    """PipeDream (plain, vertical sync, replicas [2, 1]) and 2BW on 3 ranks, 2 steps: the
    ledger shows each (stage, microbatch) backward on its forward's version with unchanged
    weights (fingerprints), the versions equal the schedule's, and the parameters match a
    single-process emulator that takes versions from the schedule (allclose; the line says
    whether they were bit-identical)."""
    cases = [
        {"label": "pipedream-3", "model": "mlp", "stages": S3, "schedule": "pipedream", "m": 6,
         "momentum": 0.0},
        {"label": "pipedream-vsync-3", "model": "mlp", "stages": S3, "schedule": "pipedream",
         "m": 6, "momentum": 0.0, "options": {"vertical_sync": True}},
        {"label": "pipedream-replicas-2-1", "model": "mlp",
         "stages": [["fc1", "act1"], S3[1] + S3[2]], "replicas": [2, 1],
         "schedule": "pipedream", "m": 6, "momentum": 0.0},
        {"label": "2bw-3", "model": "mlp", "stages": S3, "schedule": "2bw", "m": 3,
         "momentum": 0.0, "options": {"num_steps": 2}},
    ]
    result = run_torch_job(f"{WORKERS}:async_exact", 3, args=[cases, 2], timeout_s=150)
    for case in cases:
        found = lines(result, 3, f"{case['label']}: ")
        assert all("every backward on its forward's version" in ln for ln in found)
    stashed = [ln for ln in result.rank(0).stdout.splitlines() if "pipedream-3:" in ln]
    assert "(0 on stashed copies)" not in stashed[0]  # stage 0 ran on stashed versions


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_checkpoint_round_trip_in_a_fresh_job_is_bit_identical(tmp_path):
    """Train 2 steps, save, train 2 more; versus a fresh job whose trainer starts from other
    weights, loads the checkpoint and trains 2 more: identical modules and optimizer state."""
    run_torch_job(f"{WORKERS}:checkpoint_run", 2, args=[str(tmp_path), "first", 2],
                  timeout_s=120)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "manifest.json", "stage-0.pt", "stage-1.pt"]
    run_torch_job(f"{WORKERS}:checkpoint_run", 2, args=[str(tmp_path), "resume", 2],
                  timeout_s=120)
    for s in range(2):
        first = torch.load(tmp_path / f"first-stage{s}.pt", weights_only=False)
        resumed = torch.load(tmp_path / f"resume-stage{s}.pt", weights_only=False)
        for name, value in first["module"].items():
            assert torch.equal(value, resumed["module"][name]), (s, name)
        for k, st in first["optimizer"]["state"].items():
            assert torch.equal(st["momentum_buffer"],
                               resumed["optimizer"]["state"][k]["momentum_buffer"])


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["die", "stall"])
def test_dead_or_stalled_peer_gives_a_clear_error_not_a_hang(mode):
    result = run_torch_job(f"{WORKERS}:dead_peer", 2, args=[mode], timeout_s=100, grace_s=60,
                           check=False)
    out = result.rank(0).stdout
    assert "clear error after" in out and "PipelineCommError" in out, result.summary()
    assert "[rank 0]" in out and "RECV_B" in out and "rank 1 may have died" in out
    if mode == "stall":
        assert "timeout_s=2 s" in out
    else:
        assert result.rank(1).returncode == 17


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_rank_zero_plans_every_rank_gets_it_and_a_mismatch_is_refused_at_start():
    result = run_torch_job(f"{WORKERS}:plan_agreement", 2, timeout_s=100, grace_s=30,
                           check=False)
    shared = lines(result, 2, "shared plan")
    assert len({ln.split(": ", 1)[1] for ln in shared}) == 1, shared       # the same plan
    digests = lines(result, 2, "plan digest=")
    assert len({ln.split("digest=")[1] for ln in digests}) == 1, digests
    refused = lines(result, 2, "refused:")
    assert all("the ranks do not run the same plan: rank(s) [1]" in ln for ln in refused)
    assert all("share_plan" in ln for ln in refused)
    assert all(result.rank(r).returncode == 0 for r in range(2)), result.summary()


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_cuda_nccl_interleaved_matches_reference():
    result = run_torch_job(f"{WORKERS}:gpu_smoke", 1, args=[3], timeout_s=150)
    assert "matches the reference on CUDA after 3 steps" in result.rank(0).stdout


# -- one rank in this process ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group in the test process (for checks that need a world size)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed gloo backend")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=60))
    if dist.get_world_size() != 1:
        pytest.skip("a process group of another size is already initialised")
    yield
    if owned:
        dist.destroy_process_group()


def trainer(model=None, stages=None, **kw):
    args = dict(example_inputs=W.batch(0)[0], loss_fn=F.cross_entropy,
                optimizer=W.make_opt(0.9), schedule="1f1b", microbatches=3, seed=7,
                timeout_s=30)
    args.update(kw)
    return PipelineTrainer(model if model is not None else W.mlp(),
                           stages if stages is not None else [8], **args)


def test_one_rank_interleaved_hands_data_over_locally_bit_identical(one_rank):
    """Two virtual stages on one rank: no messages, outputs and gradients stay local."""
    case = {"label": "local", "model": "mlp", "stages": [3, 5], "schedule": "interleaved-1f1b",
            "m": 3, "options": {"virtual_stages": 2}}
    tr = trainer(stages=case["stages"], schedule="interleaved-1f1b",
                 schedule_options={"virtual_stages": 2})
    assert tr.stages == (0, 1) and tr.is_first and tr.is_last
    assert not any(a.kind.is_send or a.kind.is_recv for a in tr.schedule.actions[0])
    losses = [tr.step(*W.batch(n)) for n in range(3)]
    mods, ref_losses = W.reference_sync(case, 3, tr.schedule)
    for s in (0, 1):
        for name, value in tr.modules[s].state_dict().items():
            assert torch.equal(value, mods[s].state_dict()[name]), (s, name)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    W.check_timeline(tr)
    assert tr.versions() == {0: 3, 1: 3}
    assert [(r.step, r.stage, r.microbatch) for r in tr.ledger()[:3]] == [(0, 0, 0), (0, 1, 0),
                                                                         (0, 0, 1)]


def test_checkpoint_of_another_plan_is_a_clear_error(one_rank, tmp_path):
    tr = trainer()
    tr.step(*W.batch(0))
    tr.save_checkpoint(tmp_path / "ck")
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]
    other = trainer(stages=[3, 5], schedule="interleaved-1f1b",
                    schedule_options={"virtual_stages": 2})
    with pytest.raises(ConfigError, match=r"saved with stages .*'fc1'.*build the trainer with "
                                          "the plan the checkpoint was saved with"):
        other.load_checkpoint(tmp_path / "ck")
    with pytest.raises(ConfigError, match="no readable checkpoint manifest"):
        other.load_checkpoint(tmp_path / "nothing")
    same = trainer(W.mlp(seed=5))
    same.load_checkpoint(tmp_path / "ck")
    assert same.steps_done == 1 and same.versions() == {0: 1}
    for name, value in tr.modules[0].state_dict().items():
        assert torch.equal(value, same.modules[0].state_dict()[name])


def test_share_plan_round_trips_a_plan_and_refuses_anything_else(one_rank):
    from legato.adapters.torch import share_plan

    prof = profile_pipeline(W.mlp(), W.batch(0)[0], warmup=0, repeats=1)
    planned = plan(prof, 1)
    assert share_plan(planned).to_json() == planned.to_json()
    with pytest.raises(ConfigError, match=r"rank 0 passed a list, not a legato Plan; pass the "
                                          r"plan on rank 0"):
        share_plan([["fc1"]])


@pytest.mark.parametrize("tie", [False, True])
def test_every_plan_cuts_where_the_runtime_can(tie):
    """Ints from `x.size()` flow from `mix` into the attention's `view`: the profile says so,
    and no plan of 2 to 5 workers, in either cost mode, state space or objective, cuts between
    them. With `tie`, mix and proj share a weight (`meta["tied"]`): the async objective keeps
    them in one stage, the sync objective may split them (the splitter then reports the tie,
    which the runtimes sum), unless keep_tied. The splitter accepts every plan."""
    model, x = W.attn(tie=tie), W.batch(0)[0]
    prof = profile_pipeline(model, x, warmup=0, repeats=1)
    groups = [sorted(e["nodes"]) for e in prof.meta["same_stage"]]
    assert ["mix", "view_1"] in groups
    assert [sorted(e["nodes"]) for e in prof.meta.get("tied", [])] == (
        [["mix", "proj"]] if tie else [])
    assert not any("proj" in g for g in groups)
    split_seen = False
    for workers in (2, 3, 4, 5):
        for kw in ({"mode": "pipedream"}, {"mode": "paper"}, {"max_states": 4},
                   {"mode": "paper", "objective": "sync", "microbatches": 3},
                   {"mode": "paper", "objective": "sync", "microbatches": 3,
                    "keep_tied": True}):
            p = plan(prof, workers, straight=True, fewer_machines=True, **kw)
            stage_of = p.stage_of
            for g in groups:
                assert len({stage_of[n] for n in g}) == 1, (workers, kw, g)
            apart = stage_of["mix"] != stage_of["proj"]
            if kw.get("objective") != "sync" or kw.get("keep_tied"):
                assert not (tie and apart), (workers, kw)
            split = split_model(model, [list(s.nodes) for s in p.stages], x)
            assert [t.name for t in split.ties] == (["mix.weight"] if tie and apart else [])
            split_seen |= tie and apart
            assert any("to keep layers in one stage" in n for n in p.notes)
    assert split_seen == tie


@pytest.mark.parametrize("make, kw", [(nn.LSTM, {}), (nn.GRU, {"batch_first": True}),
                                      (nn.LSTM, {"bidirectional": True}),
                                      (nn.LSTM, {"proj_size": 3}), (nn.RNN, {})])
def test_a_multi_layer_rnn_is_split_into_its_layers(make, kw):
    """A 3-layer RNN becomes three layers of the pipeline (rnn.layers.0..2) sharing the
    model's own parameters; the stacked one-layer RNNs give the fused module's outputs, final
    states and gradients bit for bit; the model is not changed."""
    from legato.adapters.torch._pipeline_split import RNNLayers

    torch.manual_seed(0)
    rnn = make(5, 8, num_layers=3, **kw)
    x = torch.randn(4, 7, 5)
    ref, got = rnn(x), RNNLayers(rnn)(x)
    flat = lambda o: [o[0], *(o[1] if isinstance(o[1], tuple) else (o[1],))]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(ref), flat(got)))
    ref[0].sum().backward()
    g_ref = [p.grad.clone() for p in rnn.parameters()]
    rnn.zero_grad(set_to_none=True)
    got[0].sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(g_ref, rnn.parameters()))
    model, xb = W.lstm(), W.batch(0)[0]
    ids = layer_ids(model, xb)
    assert ids == ["view", "emb", "rnn.layers.0", "rnn.layers.1", "rnn.layers.2", "head"]
    assert type(model.rnn) is nn.LSTM and model.rnn.num_layers == 3          # untouched
    split = split_model(model, [ids[:3], ids[3:]], xb)
    mine = {id(p) for p in model.parameters()}
    assert all(id(p) in mine for m in split.modules for p in m.parameters())   # the same weights
    with torch.no_grad():
        assert torch.equal(split.modules[1](*(lambda o: o if isinstance(o, tuple) else (o,))(
            split.modules[0](xb))), model(xb))


class _RunsCode:
    """Unpickling this calls os.system: what weights_only=False would run from a checkpoint."""

    def __reduce__(self):
        import os

        return (os.system, ("touch ran-from-checkpoint",))


def test_checkpoint_loading_runs_no_code_and_names_a_bad_file(one_rank, tmp_path, monkeypatch):
    tr = trainer()
    tr.step(*W.batch(0))
    folder = tr.save_checkpoint(tmp_path / "ck")
    good = torch.load(folder / "stage-0.pt", weights_only=True)
    monkeypatch.chdir(tmp_path)
    torch.save({**good, "extra": _RunsCode()}, folder / "stage-0.pt")
    with pytest.raises(ConfigError, match=r"stage-0.pt holds objects other than tensors and "
                                          r"plain values .*cannot run code"):
        trainer(W.mlp(seed=5)).load_checkpoint(folder)
    assert not (tmp_path / "ran-from-checkpoint").exists()
    (folder / "stage-0.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ConfigError, match=r"stage-0.pt is not a readable torch checkpoint"):
        trainer(W.mlp(seed=5)).load_checkpoint(folder)
    (folder / "stage-0.pt").unlink()
    with pytest.raises(ConfigError, match=r"stage-0.pt is missing from the checkpoint"):
        trainer(W.mlp(seed=5)).load_checkpoint(folder)
    torch.save(good, folder / "stage-0.pt")            # the real state loads as before
    same = trainer(W.mlp(seed=5))
    same.load_checkpoint(folder)
    assert same.steps_done == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(stages=[4, 4]), r"world_size=1; launch 2 processes"),
    (dict(microbatches=5), r"does not split into microbatches=5 equal parts.*multiple of 5"),
    (dict(schedule="zigzag"), r"unknown schedule 'zigzag'; known: 1f1b, 1f1b-rr, 2bw"),
    (dict(replicas=[1, 1]), r"replicas=\[1, 1\] is invalid for 1 stages"),
    (dict(optimizer=torch.optim.SGD(W.mlp().parameters(), lr=0.1)), r"must be a factory"),
    (dict(microbatches=0), r"microbatches=0 is invalid"),
    (dict(schedule_options={"virtual_stages": 2}), r"does not take schedule_options"),
])
def test_bad_trainer_arguments_are_clear_errors(one_rank, kwargs, message):
    stages = kwargs.pop("stages", None)
    with pytest.raises(ConfigError, match=message):
        trainer(stages=stages, **kwargs)


def test_bad_step_inputs_are_clear_errors(one_rank):
    tr = trainer()
    with pytest.raises(ConfigError, match=r"got inputs of shapes \[\(6, 6\)\] but the trainer "
                                          r"was built for \[\(12, 6\)\]"):
        tr.step(torch.zeros(6, 6), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ConfigError, match="hosts stage 0 but step\\(\\) got inputs=None"):
        tr.step(None, W.batch(0)[1])
    bad = trainer(loss_fn=lambda out, y: out.sum(dim=1))
    with pytest.raises(ConfigError, match=r"loss_fn returned a tensor of shape \[4\]"):
        bad.step(*W.batch(0))


def test_uninitialised_process_group_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match=r"call dist.init_process_group\('gloo'\)"):
        trainer()


# -- splitting (no process group) ----------------------------------------------------------------
class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value
            return self.fc(x)
        return -self.fc(x)


class ShapeAcross(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc1(x)
        n = h.shape[0]
        return self.fc2(h).view(n, -1)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


@pytest.mark.parametrize("model, stages, message", [
    (W.mlp, [["fc1", "act1"], ["bn", "fc2", "drop", "act2", "fc3", "fc9"]],
     r"stage 1 names layer 'fc9', which Sequential does not have; did you mean \['fc4', "),
    (W.mlp, [["fc1", "act1", "bn"], ["fc2", "drop", "act2", "fc3"]],
     r"layer 'fc4' of Sequential is in no stage; .* add it to stage 1"),
    (W.mlp, [["fc1", "act1", "bn"], ["bn", "fc2", "drop", "act2", "fc3", "fc4"]],
     r"layer 'bn' is in stage 0 and again in stage 1"),
    (W.mlp, [["fc1", "bn"], ["act1", "fc2", "drop", "act2", "fc3", "fc4"]],
     r"stage 0 is not a run of consecutive layers in model order: layer 'bn' comes where the "
     r"model has 'act1'"),
    (W.mlp, [3, 3], r"layer counts \[3, 3\] must be >= 1 each and add up to the 8 layers"),
    (W.residual, [["fc1", "add"], ["fc2", "drop", "fc3", "head"]],
     r"layer 'add' \(stage 0\) reads the output of layer 'fc3', which the plan puts in the "
     r"later stage 1"),
    (Untraceable, [1], r"Untraceable is not an nn.Sequential and torch.fx cannot trace it"),
    (ShapeAcross, [["fc1"], ["fc2", "view"]],
     r"the cut after stage 0 would have to send layer 'fc1', a int|only tensors can cross"),
])
def test_models_that_cannot_be_split_as_planned_are_clear_errors(model, stages, message):
    with pytest.raises(ConfigError, match=message):
        split_model(model(), stages, W.batch(0)[0], microbatches=3)


def test_a_parameter_two_stages_use_is_a_tie_and_async_schedules_refuse_it():
    """A module called twice, in two stages: the split names the tie (the parameter, its
    stages and its name in each); a schedule that updates before the step's last backward
    (PipeDream's, 2BW) is refused naming the parameter, flushing ones are accepted."""
    from legato.adapters.torch.pipeline import _check_ties
    from legato.core.pipeline import get_schedule

    split = split_model(Tied(), [["fc"], ["fc#2"]], W.batch(0)[0], microbatches=3)
    assert [(t.name, t.stages, t.names) for t in split.ties] == [
        ("fc.weight", (0, 1), ("fc.weight", "fc.weight")),
        ("fc.bias", (0, 1), ("fc.bias", "fc.bias"))]
    assert split.ties[0].parameter_in(split.modules, 1) is split.modules[0].fc.weight
    for name in ("gpipe", "1f1b", "zb-h1"):
        _check_ties(split.ties, get_schedule(name)(2, 4))
    for name in ("pipedream", "2bw"):
        with pytest.raises(ConfigError, match=r"parameter 'fc.weight' \(and 1 more\) is used by "
                                              r"stages \[0, 1\] \(tied weights\).*updates on rank"
                                              r".*Use a schedule that updates after the whole "
                                              r"step"):
            _check_ties(split.ties, get_schedule(name)(2, 4))


def test_layer_ids_are_the_profilers_node_ids():
    x = W.batch(0)[0]
    for model in (W.mlp(), W.residual(), ShapeAcross()):
        prof = profile_pipeline(model, x, warmup=0, repeats=1)
        assert layer_ids(model, x) == [n.id for n in prof.nodes]


def test_fx_split_carries_a_skip_tensor_through_a_middle_stage():
    split = split_model(W.residual(), [["fc1"], ["fc2", "drop", "fc3"], ["add", "head"]],
                        W.batch(0)[0], microbatches=3)
    assert split.kind == "fx"
    assert [len(b) for b in split.boundaries] == [1, 2]  # relu(fc1) crosses both cuts
    assert split.boundaries[0][0].shape == (4, 16)
    assert [n for n, _ in split.modules[2].named_parameters()] == ["head.weight", "head.bias"]


def test_fifo_check_for_nccl_flags_pairs_that_disagree_on_order():
    sched = one_f_one_b(2, 4)
    assert fifo_mismatch(sched) is None
    acts = {r: list(a) for r, a in sched.actions.items()}
    recvs = [k for k, a in enumerate(acts[1]) if a.kind.is_recv]
    acts[1][recvs[0]], acts[1][recvs[1]] = acts[1][recvs[1]], acts[1][recvs[0]]
    swapped = Schedule("swapped", acts, sched.stage_ranks, 4, dict(sched.meta))
    assert "receives in the order" in fifo_mismatch(swapped)
