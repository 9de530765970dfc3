"""Ranks of the PipelineTrainer tests (run by legato.launch; no pytest here), and the
single-process references they are checked against."""

from __future__ import annotations

import collections
import copy
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from legato.adapters.torch import PipelineTrainer, microbatch_rng, split_model
from legato.core.errors import LegatoError
from legato.core.pipeline import ActionKind, Plan, StageCost, simulate, verify

K = ActionKind
LR = 0.05
BATCH = 12


# -- models --------------------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Sequential:
    """Linear layers with BatchNorm1d and Dropout; layer ids are the child names."""
    torch.manual_seed(seed)
    return nn.Sequential(collections.OrderedDict(
        fc1=nn.Linear(6, 16), act1=nn.Tanh(), bn=nn.BatchNorm1d(16), fc2=nn.Linear(16, 16),
        drop=nn.Dropout(0.25), act2=nn.ReLU(), fc3=nn.Linear(16, 12), fc4=nn.Linear(12, 4)))


class Residual(nn.Module):
    """A skip connection: FX node ids fc1, fc2, drop, fc3, add, head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.2)
        self.fc3 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.head(self.fc3(self.drop(self.fc2(h))) + h)


def residual(seed: int = 0) -> Residual:
    torch.manual_seed(seed)
    return Residual()


class Attn(nn.Module):
    """Attention over 4 tokens of 4 features: `B, D = h.size()` sends ints from `mix` to the
    `view` after the attention (nanoGPT's `B, T, C = x.size()`); `tie` shares mix's weight with
    proj (tied weights)."""

    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.fc_in, self.mix = nn.Linear(6, 16), nn.Linear(16, 16)
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.proj, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
        if tie:
            self.proj.weight = self.mix.weight

    def forward(self, x):
        h = self.mix(torch.relu(self.fc_in(x)))
        B, D = h.size()
        t = h.view(B, 4, 4)
        att = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2), dim=-1)
        y = (att @ self.v(t)).view(B, D)
        return self.head(torch.relu(self.proj(y) + h))


def attn(seed: int = 0, tie: bool = False) -> Attn:
    torch.manual_seed(seed)
    return Attn(tie)


class LSTMModel(nn.Module):
    """A 3-layer nn.LSTM language-model-like net: the planner sees each LSTM layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(2, 8)
        self.rnn = nn.LSTM(8, 8, num_layers=3, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x.view(-1, 3, 2)))
        return self.head(h[:, -1])


def lstm(seed: int = 0) -> LSTMModel:
    torch.manual_seed(seed)
    return LSTMModel()


class DictOut(nn.Module):
    """Returns a dict (logits and an auxiliary head), as many models in the wild do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 16)
        self.head, self.aux = nn.Linear(16, 4), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return {"logits": self.head(h), "aux": self.aux(h)}


def dictout(seed: int = 0) -> DictOut:
    torch.manual_seed(seed)
    return DictOut()


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: `B, T, C = x.size()`, a causal-mask buffer sliced by T."""

    def __init__(self, n_embd: int = 8, n_head: int = 2, block_size: int = 4) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(8), CausalSelfAttention(), nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A nanoGPT-style decoder as people write it: an assert on a traced length, positions
    from torch.arange(t), a shape branch; the 6 input features are 3 tokens of 2."""

    def __init__(self, block_size: int = 4) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte, self.wpe = nn.Linear(2, 8), nn.Embedding(block_size, 8)
        self.h = nn.ModuleList([GPTBlock() for _ in range(2)])
        self.ln_f, self.head = nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        x = x.view(x.shape[0], 3, 2)
        b, t, _ = x.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}"
        pos = torch.arange(0, t, dtype=torch.long, device=x.device)
        h = self.wte(x) + self.wpe(pos)
        for block in self.h:
            h = block(h)
        h = self.ln_f(h)
        if h.shape[0] > 1:
            h = h[:, -1, :]
        return self.head(h)


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT()


class Unrolled(nn.Module):
    """A recurrent cell over the sequence, unrolled by a Python loop over its length (`for t in
    range(x.size(1))`), which torch.fx cannot trace: capture='auto' falls back to
    torch.export. The cell is one module called three times: its weights are tied."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.cell, self.head = nn.Linear(2, 8), nn.GRUCell(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.emb(x.view(x.shape[0], 3, 2))
        h = x.new_zeros(x.shape[0], 8)
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
        return self.head(h)


def unrolled(seed: int = 0) -> Unrolled:
    torch.manual_seed(seed)
    return Unrolled()


VOCAB, T = 16, 4


class GPTTied(nn.Module):
    """nanoGPT's decoder with its weight tying (`self.lm_head.weight = self.wte.weight`):
    tokens in, every position's logits out, nanoGPT's loss over all positions."""

    def __init__(self, block_size: int = T) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte, self.wpe = nn.Embedding(VOCAB, 8), nn.Embedding(block_size, 8)
        self.h = nn.ModuleList([GPTBlock() for _ in range(2)])
        self.ln_f = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        b, t = idx.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt_tied(seed: int = 0) -> GPTTied:
    torch.manual_seed(seed)
    return GPTTied()


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def token_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return (torch.randint(0, VOCAB, (BATCH, T), generator=g),
            torch.randint(0, VOCAB, (BATCH, T), generator=g))


def dict_loss(out, y):
    return F.cross_entropy(out["logits"], y) + 0.1 * out["aux"].pow(2).mean()


MODELS = {"mlp": mlp, "residual": residual, "attn": attn, "lstm": lstm, "dictout": dictout,
          "gpt": gpt, "gpt_tied": gpt_tied, "unrolled": unrolled}
LOSSES = {"dictout": dict_loss, "gpt_tied": lm_loss}          # others: F.cross_entropy


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 4, (BATCH,), generator=g)


def data(case: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's minibatch `step`: tokens for the language models, else `batch`."""
    return token_batch(step) if case["model"] == "gpt_tied" else batch(step)


def make_opt(momentum: float):
    return lambda ps: torch.optim.SGD(ps, lr=LR, momentum=momentum)


def stages_of(case: dict) -> list:
    """The case's stages: its list, or the nodes of the Plan saved at case["plan"]."""
    if "plan" in case:
        return [list(st.nodes) for st in Plan.load(case["plan"]).stages]
    return case["stages"]


def build(case: dict, **extra) -> PipelineTrainer:
    plan = Plan.load(case["plan"]) if "plan" in case else case["stages"]
    return PipelineTrainer(
        MODELS[case["model"]](), plan, example_inputs=data(case, 0)[0],
        loss_fn=LOSSES.get(case["model"], F.cross_entropy),
        optimizer=make_opt(case.get("momentum", 0.9)),
        schedule=case["schedule"], microbatches=case["m"], replicas=case.get("replicas"),
        schedule_options=case.get("options"), seed=7, timeout_s=60,
        capture=case.get("capture", "auto"), **extra)


# -- references ----------------------------------------------------------------------------------
def reference_sync(case: dict, steps: int, schedule):
    """Single process: the same stage modules on the same microbatches, each loss / m, gradients
    accumulated in microbatch order; a replicated stage sums each replica's own accumulation
    (replica j: microbatches i with i % replicas == j), as its all-reduce does. A tied parameter
    gets one copy per stage using it, each accumulating its own stage's gradients in microbatch
    order; before the update every copy's gradient is the sum of the copies' (two stages: one
    addition, which is exact in either order)."""
    m = schedule.num_microbatches
    split = split_model(MODELS[case["model"]](), stages_of(case), data(case, 0)[0],
                        microbatches=m, capture=case.get("capture", "auto"))
    mods = split.modules
    copies = []
    for tie in split.ties:
        first = tie.parameter_in(mods, tie.stages[0])
        group = [first]
        for s, name in zip(tie.stages[1:], tie.names[1:]):
            owner, _, attr = name.rpartition(".")
            clone = nn.Parameter(first.detach().clone())
            setattr(mods[s].get_submodule(owner) if owner else mods[s], attr, clone)
            group.append(clone)
        copies.append(group)
    reps = [len(r) for r in schedule.stage_ranks]
    momentum = case.get("momentum", 0.9)
    opts = [torch.optim.SGD(list(mod.parameters()), lr=LR, momentum=momentum)
            for mod in mods if list(mod.parameters())]
    all_losses = []
    for n in range(steps):
        x, y = data(case, n)
        xs, ys = x.chunk(m), y.chunk(m)
        acc: dict[int, list] = {s: [None] * r for s, r in enumerate(reps) if r > 1}
        losses = []
        for i in range(m):
            h: tuple = (xs[i],)
            for s, mod in enumerate(mods):
                with microbatch_rng(7, n, s, i):
                    h = mod(*h)
            loss = LOSSES.get(case["model"], F.cross_entropy)(h, ys[i])
            losses.append(loss.detach())
            (loss / m).backward()
            for s, parts in acc.items():
                j = i % reps[s]
                ps = list(mods[s].parameters())
                parts[j] = [p.grad if parts[j] is None else parts[j][k] + p.grad
                            for k, p in enumerate(ps)]
                for p in ps:
                    p.grad = None
        for s, parts in acc.items():
            for k, p in enumerate(mods[s].parameters()):
                total = parts[0][k]
                for part in parts[1:]:
                    total = total + part[k]
                p.grad = total
        for group in copies:
            total = group[0].grad
            for p in group[1:]:
                total = total + p.grad
            for p in group:
                p.grad = total.clone()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        all_losses.append(torch.stack(losses).mean())
    return mods, all_losses


def reference_unsplit(case: dict, steps: int, m: int) -> nn.Module:
    """Plain PyTorch, no pipeline: the unsplit model (tied weights tied), each microbatch's
    loss / m backpropagated in turn, one SGD step per minibatch."""
    model = MODELS[case["model"]]()
    opt = make_opt(case.get("momentum", 0.9))(list(model.parameters()))
    for n in range(steps):
        x, y = data(case, n)
        for xi, yi in zip(x.chunk(m), y.chunk(m)):
            (LOSSES.get(case["model"], F.cross_entropy)(model(xi), yi) / m).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def emulate_async(case: dict, steps: int, schedule):
    """Single process delayed-update emulator. Versions come from the schedule (the verifier's
    report, never from the runtime): microbatch i at stage s computes its gradient with every
    stage t at the version t used for i, and the gradients between two STEPs of a stage are
    summed and applied to its latest weights (replicas: their mean)."""
    report = verify(schedule)
    mps = schedule.meta.get("microbatches_per_step") or 1
    m = schedule.num_microbatches
    split = split_model(MODELS[case["model"]](), stages_of(case), batch(0)[0], microbatches=m)
    mods = split.modules
    S = len(mods)
    W = [[{n: p.detach().clone() for n, p in mod.named_parameters()}] for mod in mods]
    losses_out = []
    for n in range(steps):
        x, y = batch(n)
        xs, ys = x.chunk(m), y.chunk(m)
        base = [len(W[s]) - 1 for s in range(S)]
        grads: dict[int, list[dict]] = {}
        losses = []
        acc: dict[tuple[int, int], dict | None] = {}
        rounds_done: dict[int, int] = collections.Counter()

        def grad_of(i: int) -> list[dict]:
            if i in grads:
                return grads[i]
            leaves = [{k: w.clone().requires_grad_(True) for k, w in
                       W[t][base[t] + report.versions[(t, i)]].items()} for t in range(S)]
            h: tuple = (xs[i],)
            for t, mod in enumerate(mods):
                with microbatch_rng(7, n, t, i):
                    h = torch.func.functional_call(mod, leaves[t], h)
            loss = LOSSES.get(case["model"], F.cross_entropy)(h, ys[i])
            losses.append(loss.detach())
            flat = [w for d in leaves for w in d.values()]
            g = torch.autograd.grad(loss / mps if mps != 1 else loss, flat)
            out, k = [], 0
            for d in leaves:
                out.append({name: g[k + j] for j, name in enumerate(d)})
                k += len(d)
            grads[i] = out
            return out

        for rank, pos in report.order:
            a = schedule.actions[rank][pos]
            if a.kind in (K.BACKWARD, K.BACKWARD_WEIGHT):
                g = grad_of(a.microbatch)[a.stage]
                key = (a.stage, rank)
                acc[key] = dict(g) if acc.get(key) is None else {
                    k: acc[key][k] + g[k] for k in g}
            elif a.kind is K.STEP and a.microbatch >= rounds_done[a.stage]:
                s = a.stage
                parts = [acc.get((s, r)) for r in schedule.stage_ranks[s]]
                total = parts[0]
                for part in parts[1:]:
                    total = {k: total[k] + part[k] for k in total}
                if len(parts) > 1 and not schedule.meta.get("microbatches_per_step"):
                    total = {k: v / len(parts) for k, v in total.items()}
                W[s].append({k: w.add(total[k], alpha=-LR) for k, w in W[s][-1].items()})
                for r in schedule.stage_ranks[s]:
                    acc[(s, r)] = None
                rounds_done[s] += 1
        losses_out.append(losses)
    return W, report


# -- checks --------------------------------------------------------------------------------------
def check_timeline(trainer: PipelineTrainer) -> str:
    rank = trainer.rank
    spans = trainer.timeline()
    acts = trainer.schedule.actions[rank]
    assert [sp.action for sp in spans] == acts, (rank, spans[:4], acts[:4])
    for a, b in zip(spans, spans[1:]):
        assert a.start_s <= a.end_s <= b.start_s, (a, b)
    assert spans[-1].start_s <= spans[-1].end_s
    everyone = trainer.timeline(gather=True)
    assert {sp.rank for sp in everyone} == set(trainer.schedule.ranks)
    assert min(sp.start_s for sp in everyone) == 0.0
    # the simulator's prediction covers the same (rank, action) cells
    fwd = [sp.end_s - sp.start_s for sp in everyone if sp.action.kind is K.FORWARD]
    bwd = [sp.end_s - sp.start_s for sp in everyone if sp.action.kind is K.BACKWARD]
    cost = StageCost(forward_s=sum(fwd) / len(fwd), backward_s=sum(bwd) / max(len(bwd), 1))
    sim = simulate(trainer.schedule, cost)
    assert {(sp.rank, sp.action) for sp in sim.timeline} == {(sp.rank, sp.action)
                                                             for sp in everyone}
    measured = max(sp.end_s for sp in everyone)
    return f"makespan measured {measured * 1e3:.1f} ms, simulated {sim.makespan_s * 1e3:.1f} ms"


def sync_exact(cases: list[dict], steps: int) -> None:
    """Each case: train `steps` steps; every rank's stages must equal the reference bit for bit
    (parameters and buffers), and the loss on the last stage too; a case with "exact": False
    (a sum of three or more ranks' terms in gloo's order) within rounding."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in cases:
        trainer = build(case)
        got = []
        for n in range(steps):
            x, y = data(case, n)
            got.append(trainer.step(x if trainer.is_first else None,
                                    y if trainer.is_last else None))
        mods, losses = reference_sync(case, steps, trainer.schedule)
        if case.get("unsplit"):
            plain = reference_unsplit(case, steps, trainer.num_microbatches)
            named = dict(plain.named_parameters(remove_duplicate=False))
            # a stage names a parameter as its capture does (an exported RNN's layers):
            # the model's own name, through a fresh split of a fresh model
            fresh = MODELS[case["model"]]()
            original = {id(p): n for n, p in fresh.named_parameters(remove_duplicate=False)}
            again = split_model(fresh, stages_of(case), data(case, 0)[0],
                                microbatches=trainer.num_microbatches,
                                capture=case.get("capture", "auto"))
            for s in trainer.stages:
                rename = {n: original[id(p)] for n, p in again.modules[s].named_parameters()}
                for name, p in trainer.modules[s].named_parameters():
                    ref = named[rename[name]]
                    assert torch.allclose(p, ref, rtol=1e-5, atol=1e-6), (
                        f"rank {rank} {case['label']}: stage {s} {name} differs from plain "
                        f"training by {(p - ref).abs().max().item()}")
        exact = case.get("exact", True)

        def same(a, b):
            return torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-6)

        for s in trainer.stages:
            ours, ref = trainer.modules[s].state_dict(), mods[s].state_dict()
            assert list(ours) == list(ref), (list(ours), list(ref))
            for name in ours:
                assert same(ours[name], ref[name]), (
                    f"rank {rank} {case['label']}: stage {s} {name} differs by "
                    f"{(ours[name].double() - ref[name].double()).abs().max().item()}")
        if trainer.is_last and trainer.schedule.replicas(trainer.schedule.num_stages - 1) == 1:
            for n in range(steps):
                assert same(got[n], losses[n]), (case["label"], n, got[n], losses[n])
        else:
            assert all(g is None for g in got) or trainer.is_last
        note = check_timeline(trainer)
        said = "bit-identical" if exact else "equal within rounding"
        print(f"rank {rank}: {case['label']} {said} after {steps} steps; {note}", flush=True)
    dist.destroy_process_group()


def async_exact(cases: list[dict], steps: int) -> None:
    """Each case: the ledger shows every backward used its forward's version (and unchanged
    weights), versions agree with the schedule's, and parameters match the emulator."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in cases:
        trainer = build(case, check_versions=True)
        for n in range(steps):
            x, y = batch(n)
            trainer.step(x if trainer.is_first else None, y if trainer.is_last else None)
        W, report = emulate_async(case, steps, trainer.schedule)
        per_call = {s: sum(1 for a in trainer.schedule.actions[rank]
                           if a.kind is K.STEP and a.stage == s) for s in trainer.stages}
        records = trainer.ledger()
        assert len(records) == steps * sum(
            1 for a in trainer.schedule.actions[rank] if a.kind is K.FORWARD)
        stashed = 0
        for r in records:
            assert r.backward_version == r.forward_version, r
            assert r.backward_fingerprint == r.forward_fingerprint, r
            local = r.forward_version - r.step * per_call[r.stage]
            assert local == report.versions[(r.stage, r.microbatch)], (r, local)
            stashed += r.stashed
        exact = True
        for s in trainer.stages:
            final = W[s][-1]
            assert trainer.versions()[s] == len(W[s]) - 1
            for name, p in trainer.modules[s].named_parameters():
                assert torch.allclose(p, final[name], rtol=1e-5, atol=1e-6), (
                    f"rank {rank} {case['label']}: stage {s} {name} differs by "
                    f"{(p - final[name]).abs().max().item()}")
                exact &= torch.equal(p, final[name])
        print(f"rank {rank}: {case['label']}: {len(records)} ledger records, every backward "
              f"on its forward's version ({stashed} on stashed copies); matches the emulator "
              f"after {steps} steps ({'bit-identical' if exact else 'allclose'})", flush=True)
    dist.destroy_process_group()


CKPT_CASE = {"label": "ckpt", "model": "mlp", "stages": [["fc1", "act1", "bn"],
             ["fc2", "drop", "act2", "fc3", "fc4"]], "schedule": "1f1b", "m": 3}


def checkpoint_run(folder: str, phase: str, steps: int) -> None:
    """phase "first": train, save, train on, dump; phase "resume": a fresh trainer (other
    initial weights) loads the checkpoint, trains on, dumps."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    trainer = build(CKPT_CASE) if phase == "first" else PipelineTrainer(
        mlp(seed=99), CKPT_CASE["stages"], example_inputs=batch(0)[0], loss_fn=F.cross_entropy,
        optimizer=make_opt(0.9), schedule="1f1b", microbatches=3, seed=7, timeout_s=60)

    def train(first: int) -> None:
        for n in range(first, first + steps):
            x, y = batch(n)
            trainer.step(x, y)

    if phase == "first":
        train(0)
        trainer.save_checkpoint(os.path.join(folder, "ckpt"))
    else:
        trainer.load_checkpoint(os.path.join(folder, "ckpt"))
        assert trainer.steps_done == steps
    train(steps)
    for s in trainer.stages:
        state = {"module": trainer.modules[s].state_dict(),
                 "optimizer": trainer.optimizers[s].state_dict()}
        torch.save(state, os.path.join(folder, f"{phase}-stage{s}.pt"))
    print(f"rank {rank}: {phase} done", flush=True)
    dist.destroy_process_group()


def dead_peer(mode: str) -> None:
    """After the first step rank 1 dies ("die") or stalls past the timeout ("stall"); rank 0
    must fail with a clear error, not hang."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    timeout_s = 2 if mode == "stall" else 30
    trainer = PipelineTrainer(mlp(), CKPT_CASE["stages"], example_inputs=batch(0)[0],
                              loss_fn=F.cross_entropy, optimizer=make_opt(0.0),
                              schedule="1f1b", microbatches=3, timeout_s=timeout_s)
    x, y = batch(0)
    trainer.step(x, y)
    if rank == 1:
        if mode == "stall":
            time.sleep(2.5 * timeout_s)
            os._exit(0)
        os._exit(17)
    start = time.monotonic()
    try:
        for _ in range(3):
            trainer.step(x, y)
    except LegatoError as err:
        print(f"rank {rank}: clear error after {time.monotonic() - start:.1f} s: "
              f"{type(err).__name__}: {err}", flush=True)
        os._exit(0)
    print(f"rank {rank}: no error although rank 1 stopped", flush=True)
    os._exit(1)


def plan_agreement() -> None:
    """Rank 0 profiles and plans, share_plan gives every rank its plan, and a trainer runs it.
    Then each rank builds a trainer with its own stages (rank 1 cuts elsewhere): every rank
    must refuse it at construction, before the first step."""
    from legato.adapters.torch import profile_pipeline, share_plan
    from legato.core.errors import ConfigError
    from legato.core.pipeline import plan as make_plan

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mine = None
    if rank == 0:
        prof = profile_pipeline(mlp(), batch(0)[0], warmup=0, repeats=1)
        mine = make_plan(prof, 2, straight=True)
    shared = share_plan(mine)
    print(f"rank {rank}: shared plan {[list(s.nodes) for s in shared.stages]}", flush=True)
    trainer = PipelineTrainer(mlp(), shared, example_inputs=batch(0)[0],
                              loss_fn=F.cross_entropy, optimizer=make_opt(0.0),
                              schedule="1f1b", microbatches=2, timeout_s=30)
    trainer.step(*batch(0))
    print(f"rank {rank}: trained, plan digest={trainer.plan_digest.hex()}", flush=True)
    stages = CKPT_CASE["stages"] if rank == 0 else S2_OTHER
    try:
        PipelineTrainer(mlp(), stages, example_inputs=batch(0)[0], loss_fn=F.cross_entropy,
                        optimizer=make_opt(0.0), schedule="1f1b", microbatches=2, timeout_s=30)
    except ConfigError as err:
        print(f"rank {rank}: refused: {err}", flush=True)
        os._exit(0)
    print(f"rank {rank}: a mismatched plan was accepted", flush=True)
    os._exit(1)


S2_OTHER = [["fc1", "act1"], ["bn", "fc2", "drop", "act2", "fc3", "fc4"]]


def torch_runtime(cases: list[dict], steps: int, csv_dir: str) -> None:
    """Each case: the same stages and microbatches under PipelineTrainer (legato's runtime, the
    legato schedule named in the case) and under torch.distributed.pipelining (the torch
    schedule named in the case), SGD with momentum on both. The ranks holding each runtime's
    last stage print its losses; every rank prints the largest difference over the stages both
    runtimes put on it; rank 0 writes torch's schedule CSV."""
    from legato.adapters.torch import torch_pipeline

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in cases:
        case.setdefault("model", "mlp")
        model = MODELS[case["model"]]()
        if case["model"] == "mlp":
            model.drop.p = 0.0                # no dropout: torch draws its own masks
        loss_fn = LOSSES.get(case["model"], F.cross_entropy)
        x0 = data(case, 0)[0]
        trainer = PipelineTrainer(copy.deepcopy(model), case["stages"], example_inputs=x0,
                                  loss_fn=loss_fn, optimizer=make_opt(0.9),
                                  schedule=case["legato"], microbatches=case["m"],
                                  schedule_options=case.get("options"), timeout_s=60,
                                  capture=case.get("capture", "auto"))
        ours = []
        for n in range(steps):
            x, y = data(case, n)
            ours.append(trainer.step(x if trainer.is_first else None,
                                     y if trainer.is_last else None))
        pipe = torch_pipeline(copy.deepcopy(model), case["stages"], example_inputs=x0,
                              microbatches=case["m"], loss_fn=loss_fn,
                              schedule=case["torch"], capture=case.get("capture", "auto"))
        params = pipe.parameters()          # a rank of parameter-free stages has none
        opt = torch.optim.SGD(params, lr=LR, momentum=0.9) if params else None
        theirs = []
        for n in range(steps):
            x, y = data(case, n)
            theirs.append(pipe.step(x if pipe.is_first else None, y if pipe.is_last else None))
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        if rank == 0:
            pipe.dump_csv(os.path.join(csv_dir, f"{case['label']}.csv"))
        if trainer.is_last:
            print(f"rank {rank}: {case['label']} legato losses "
                  f"{[float(v) for v in ours]}", flush=True)
        if pipe.is_last:
            print(f"rank {rank}: {case['label']} torch losses "
                  f"{[float(v) for v in theirs]}", flush=True)
        both = sorted(set(pipe.modules) & set(trainer.stages))
        diff = max([0.0] + [(a.double() - b.double()).abs().max().item() for s in both
                            for a, b in zip(pipe.modules[s].state_dict().values(),
                                            trainer.modules[s].state_dict().values())])
        print(f"rank {rank}: {case['label']} stages {both} max difference {diff:.3e}",
              flush=True)
    dist.destroy_process_group()


def gpu_smoke(steps: int) -> None:
    """One rank on CUDA with NCCL: interleaved 1F1B with two virtual stages on the rank (data
    handed over locally), against the single-process reference on the same GPU."""
    dist.init_process_group("nccl")
    torch.cuda.set_device(0)
    case = {"label": "gpu-interleaved", "model": "mlp", "stages": [3, 5],
            "schedule": "interleaved-1f1b", "m": 3, "options": {"virtual_stages": 2}}
    trainer = PipelineTrainer(
        mlp().cuda(), case["stages"], example_inputs=batch(0)[0].cuda(), loss_fn=F.cross_entropy,
        optimizer=make_opt(0.9), schedule=case["schedule"], microbatches=3,
        schedule_options={"virtual_stages": 2}, seed=7, timeout_s=60)
    assert trainer.backend == "nccl"
    for n in range(steps):
        x, y = batch(n)
        trainer.step(x.cuda(), y.cuda())
    ref = mlp().cuda()
    split = split_model(ref, case["stages"], batch(0)[0].cuda(), microbatches=3)
    opts = [torch.optim.SGD(list(mod.parameters()), lr=LR, momentum=0.9) for mod in split.modules]
    for n in range(steps):
        x, y = batch(n)
        for i, (xc, yc) in enumerate(zip(x.cuda().chunk(3), y.cuda().chunk(3))):
            h: tuple = (xc,)
            for s, mod in enumerate(split.modules):
                with microbatch_rng(7, n, s, i, torch.device("cuda", 0)):
                    h = mod(*h)
            (F.cross_entropy(h, yc) / 3).backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    for s in trainer.stages:
        for (name, p), q in zip(trainer.modules[s].named_parameters(),
                                split.modules[s].parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (s, name)
    print(f"rank 0: {case['label']} matches the reference on CUDA after {steps} steps",
          flush=True)
    dist.destroy_process_group()
