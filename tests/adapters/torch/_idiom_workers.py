"""Ranks of the tests of common training-loop idioms under ScheduledOptimizer (mixed precision,
gradient accumulation, clipping, DDP mix-ups, frozen parameters), each against DDP doing the
same thing (run by legato.launch; no pytest here)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from _workers import Net, batch, make_optimizer  # the launcher puts this directory on sys.path
from legato.adapters.torch import ScheduledOptimizer
from legato.core.errors import ConfigError, LegatoError

DDP = nn.parallel.DistributedDataParallel


def _pair(opt_name: str):
    torch.manual_seed(0)
    ours, ref = Net(), Net()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _assert_same(rank: int, ours: nn.Module, ref: nn.Module, what: str) -> None:
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        diff = (p - q).abs().max().item()
        assert torch.equal(p, q), f"rank {rank} {what}: {name} differs from DDP by {diff}"


def _side_by_side(ddp, ref_opt, ours, opt, rank: int, steps: int, what: str,
                  autocast: torch.dtype | None = None) -> None:
    """`steps` plain steps of DDP and of ours on the same batches; parameters must be equal."""
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        x, y = batch(rank, step)
        for model, optimizer in ((ddp, ref_opt), (ours, opt)):
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16,
                                enabled=autocast is not None):
                loss = loss_fn(model(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    opt.synchronize()
    _assert_same(rank, ours, ddp.module, what)


def amp_matches_ddp(opt_name: str, policy: str, settings: dict, steps: int,
                    overflow: dict, clip: str | None, accumulate: str | None,
                    model_name: str = "net", dtype: str = "fp16") -> None:
    """fp16 autocast with torch.amp.GradScaler, the standard loop, on both sides. `overflow`
    maps a step to the one rank whose loss is made infinite there (so only that rank's own
    gradients overflow: every rank must still skip). `clip`: None, "unscale" (scaler.unscale_
    then clip_grad_norm_) or "argument" (clip_grad_norm= on ours, unscale_+clip on DDP's).
    `accumulate`: None, "bpps" (backward_passes_per_step=2) or "no_sync" (two backward passes,
    the first under no_sync). `model_name`: "net" (small), "resnet50" or "bert" (below);
    `dtype`: the autocast type, "fp16" or "bf16" (GradScaler either way)."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ours, ref = _pair(opt_name) if model_name == "net" else _real_pair(model_name)
    # BatchNorm's running statistics stay local, as with ScheduledOptimizer
    ddp = DDP(ref, broadcast_buffers=False)
    ref_opt = make_optimizer(opt_name, ddp.parameters())
    extra = dict(settings)
    if clip == "argument":
        extra["clip_grad_norm"] = 1.0
    if accumulate == "bpps":
        extra["backward_passes_per_step"] = 2
    opt = ScheduledOptimizer(make_optimizer(opt_name, ours.parameters()), ours, policy=policy,
                             timeout_s=60, **extra)
    # A small growth interval, so that the scale both grows and backs off within the run.
    # (The real models overflow fp16 at a scale of 4096 from the start: they begin lower.)
    init_scale = 2.0 ** 12 if model_name == "net" else 1.0
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
               for _ in range(2)]
    loss_fn = nn.CrossEntropyLoss()
    skipped = [0, 0]
    passes = 2 if accumulate else 1
    for step in range(steps):
        for side, (model, optimizer, scaler) in enumerate(
                [(ddp, ref_opt, scalers[0]), (ours, opt, scalers[1])]):
            for micro in range(passes):
                x, y = _inputs(model_name, rank, 10 * step + micro)
                last = micro == passes - 1
                local = not last and (side == 0 or accumulate == "no_sync")
                # DDP's no_sync() must hold the forward pass too
                with (model.no_sync() if side == 0 else optimizer.no_sync()) if local \
                        else contextlib.nullcontext():
                    with torch.autocast("cpu", dtype=getattr(torch, {
                            "fp16": "float16", "bf16": "bfloat16"}[dtype])):
                        loss = loss_fn(model(x).float().flatten(0, -2), y.flatten())
                    if overflow.get(str(step)) == rank and last:
                        loss = loss * float("inf")
                    scaler.scale(loss).backward()
            if clip == "unscale" or (clip == "argument" and side == 0):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped[side] += scaler.get_scale() < before
            optimizer.zero_grad()
    opt.synchronize()
    _assert_same(rank, ours, ref, "amp")
    assert scalers[0].get_scale() == scalers[1].get_scale(), \
        (scalers[0].get_scale(), scalers[1].get_scale())
    assert scalers[0].state_dict() == scalers[1].state_dict()
    assert skipped[0] == skipped[1] == len(overflow), (skipped, overflow)
    assert opt.stats["steps_skipped"] == len(overflow), opt.stats
    opt.close()
    print(f"rank {rank}: amp {model_name} {dtype} {opt_name}/{policy} clip={clip} "
          f"accumulate={accumulate} matches "
          f"DDP after {steps} steps (bit-exact), {skipped[1]} skipped, scale "
          f"{scalers[1].get_scale():g}", flush=True)
    dist.destroy_process_group()


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016, torchvision's layout): 25.6 M parameters, 161 tensors."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for mid, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(count):
                blocks.append(_Bottleneck(cin, mid, stride if i == 0 else 1))
                cin = mid * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1)
        return self.fc(torch.flatten(x, 1))


class BertBase(nn.Module):
    """BERT-base's shape (Devlin et al. 2019): 12 post-norm encoder layers of width 768, 12
    heads, GELU feed-forward of 3072, token and position embeddings over a 30522-word
    vocabulary, a masked-language-model head: 132 M parameters (the head untied)."""

    def __init__(self, vocab: int = 30522, width: int = 768, layers: int = 12,
                 heads: int = 12, ffn: int = 3072, positions: int = 512) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(positions, width)
        self.norm = nn.LayerNorm(width)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0, activation="gelu",
                                       batch_first=True) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.norm(self.tokens(ids) + self.positions(torch.arange(ids.shape[1])))
        for layer in self.encoder:
            x = layer(x)
        return self.head(x)


def _real_pair(name: str):
    torch.manual_seed(0)
    make = {"resnet50": ResNet50, "bert": BertBase}[name]
    ours, ref = make(), make()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _inputs(model_name: str, rank: int, step: int):
    if model_name == "net":
        return batch(rank, step)
    g = torch.Generator().manual_seed(1000 * step + rank)
    if model_name == "resnet50":
        return torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 1000, (2,), generator=g)
    ids = torch.randint(0, 30522, (2, 32), generator=g)
    return ids, ids  # predict the tokens themselves: a masked-LM loss without the masking


def bf16_matches_ddp(steps: int) -> None:
    """bf16 autocast needs no scaler: parameters equal DDP's."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ours, ref = _pair("adamw")
    ddp = DDP(ref)
    ref_opt = make_optimizer("adamw", ddp.parameters())
    opt = ScheduledOptimizer(make_optimizer("adamw", ours.parameters()), ours, timeout_s=60,
                             partition_bytes=32 * 1024, credit_bytes=96 * 1024)
    _side_by_side(ddp, ref_opt, ours, opt, rank, steps, "bf16", autocast=torch.bfloat16)
    opt.close()
    print(f"rank {rank}: bf16 matches DDP after {steps} steps (bit-exact)", flush=True)
    dist.destroy_process_group()


def accumulate_matches_ddp(how: str, policy: str, steps: int) -> None:
    """Three backward passes per step, against DDP's no_sync accumulation."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ours, ref = _pair("sgd")
    ddp = DDP(ref)
    ref_opt = make_optimizer("sgd", ddp.parameters())
    extra = {"backward_passes_per_step": 3} if how == "bpps" else {}
    opt = ScheduledOptimizer(make_optimizer("sgd", ours.parameters()), ours, policy=policy,
                             timeout_s=60, **extra)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        for model, optimizer in ((ddp, ref_opt), (ours, opt)):
            for micro in range(3):
                x, y = batch(rank, 10 * step + micro)
                if micro < 2 and (model is ddp or how == "no_sync"):
                    with model.no_sync() if model is ddp else optimizer.no_sync():
                        loss_fn(model(x), y).backward()
                else:
                    loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    opt.synchronize()
    _assert_same(rank, ours, ref, f"accumulation ({how})")
    # Stepping after too few passes is a clear error.
    if how == "bpps":
        x, y = batch(rank, 99)
        loss_fn(ours(x), y).backward()
        try:
            opt.step()
        except LegatoError as err:
            assert "backward_passes_per_step=3" in str(err), err
        else:
            raise AssertionError("a step after 1 of 3 backward passes was accepted")
    opt.close()
    print(f"rank {rank}: accumulation ({how}, {policy}) matches DDP after {steps} steps "
          "(bit-exact)", flush=True)
    dist.destroy_process_group()


def clip_idioms(mode: str, policy: str, steps: int) -> None:
    """clip_grad_norm_(model.parameters()) between backward and step. "synchronize": after
    opt.synchronize(), as with Horovod: equal to DDP with the same clipping. "bare": without
    it: the job must fail with the fix named, whatever the timing."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ours, ref = _pair("sgd")
    ddp = DDP(ref)
    ref_opt = make_optimizer("sgd", ddp.parameters())
    opt = ScheduledOptimizer(make_optimizer("sgd", ours.parameters()), ours, policy=policy,
                             timeout_s=60)
    loss_fn = nn.CrossEntropyLoss()
    try:
        for step in range(steps):
            x, y = batch(rank, step)
            if mode == "synchronize":
                # (not when the job is to fail: DDP's own collectives would then meet a peer
                # that already stopped on legato's refusal, and fail first, in DDP)
                loss_fn(ddp(x), y).backward()
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.5)
                ref_opt.step()
                ref_opt.zero_grad()
            loss_fn(ours(x), y).backward()
            if mode == "synchronize":
                opt.synchronize()
            torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
        opt.synchronize()
    except LegatoError as err:
        assert mode == "bare", err
        if "opt.synchronize()" in str(err) and "clip_grad_norm" in str(err):
            print(f"rank {rank}: clipping without synchronize refused: {err}", flush=True)
        else:  # the peer refused first and stopped: this rank's next message failed
            print(f"rank {rank}: stopped with its peer: {err}", flush=True)
        opt.close()
        dist.destroy_process_group()
        return
    assert mode == "synchronize", "clip_grad_norm_ on gradients in flight was accepted"
    _assert_same(rank, ours, ref, "clip")
    opt.close()
    print(f"rank {rank}: clipping after synchronize matches DDP after {steps} steps "
          "(bit-exact)", flush=True)
    dist.destroy_process_group()


def ddp_mixups() -> None:
    """DDP and ScheduledOptimizer on the same parameters, three ways: all refused."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    refused = 0
    model = Net()
    ddp = DDP(model)
    for passed in (model, ddp):  # the inner model, or the DDP object itself
        try:
            ScheduledOptimizer(make_optimizer("sgd", model.parameters()), passed, timeout_s=30)
        except ConfigError as err:
            assert "DistributedDataParallel" in str(err) and "register_scheduled_hook" in \
                str(err), err
            refused += 1
    del ddp
    model = Net()
    opt = ScheduledOptimizer(make_optimizer("sgd", model.parameters()), model, timeout_s=30)
    late = DDP(model)  # built after the optimizer: refused at the first step
    x, y = batch(rank, 0)
    loss_fn(late(x), y).backward()
    try:
        opt.step()
    except ConfigError as err:
        assert "DistributedDataParallel" in str(err), err
        refused += 1
    opt.close()
    assert refused == 3, refused
    print(f"rank {rank}: DDP mix-ups refused: {refused} of 3", flush=True)
    dist.destroy_process_group()


def frozen_matches_ddp(steps: int) -> None:
    """An optimizer built from all of model.parameters() with the first layer frozen."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ours, ref = _pair("adam")
    for model in (ours, ref):
        model.conv1.requires_grad_(False)
    ddp = DDP(ref)
    ref_opt = make_optimizer("adam", ddp.parameters())
    opt = ScheduledOptimizer(make_optimizer("adam", ours.parameters()), ours, timeout_s=60)
    _side_by_side(ddp, ref_opt, ours, opt, rank, steps, "frozen")
    opt.close()
    print(f"rank {rank}: frozen layer matches DDP after {steps} steps (bit-exact)", flush=True)
    dist.destroy_process_group()


def two_optimizers(backend: str, steps: int) -> None:
    """Two models with a ScheduledOptimizer each in one process (an A/B comparison), under
    torch.distributed or Horovod: both train, and every rank ends with the same parameters."""
    if backend == "horovod":
        import horovod.torch as hvd

        hvd.init()
        rank = hvd.rank()
    else:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    torch.manual_seed(rank)  # different starts: broadcast_parameters makes them equal
    models = [Net(), Net()]
    opts = [ScheduledOptimizer(make_optimizer(name, m.parameters()), m, backend=backend,
                               timeout_s=60)
            for name, m in zip(("sgd", "adam"), models)]
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        x, y = batch(rank, step)
        for model, opt in zip(models, opts):
            loss_fn(model(x), y).backward()
            opt.step()
    for opt in opts:  # (closed before the check: their followers wait in Horovod broadcasts)
        opt.close()
    flat = torch.cat([p.detach().reshape(-1) for m in models for p in m.parameters()])
    if backend == "horovod":
        gathered = hvd.allgather(flat.unsqueeze(0))
        same = all(torch.equal(gathered[0], g) for g in gathered)
    else:
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        same = all(torch.equal(gathered[0], g) for g in gathered)
    assert same, "ranks ended with different parameters"
    print(f"rank {rank}: two optimizers over {backend} trained {steps} steps, ranks identical",
          flush=True)
    if backend != "horovod":
        dist.destroy_process_group()


class _Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 64), nn.Linear(64, 16)

    def forward(self, z):
        return torch.tanh(self.fc2(torch.relu(self.fc1(z))))


class _Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _gan_data(rank: int, it: int):
    g = torch.Generator().manual_seed(100 * it + rank)
    return torch.randn(8, 16, generator=g) * 0.5 + 1.0, torch.randn(8, 8, generator=g)


def _gan_iterations(gen, disc, opt_g, opt_d, rank: int, iters: int) -> None:
    """The usual GAN loop: the generator's loss back-propagates into the discriminator's
    parameters too, and the discriminator's next iteration starts with zero_grad()."""
    bce = nn.BCEWithLogitsLoss()
    labels = torch.cat([torch.ones(8, 1), torch.zeros(8, 1)])
    for it in range(iters):
        real, z = _gan_data(rank, it)
        fake = gen(z)
        opt_d.zero_grad()
        bce(disc(torch.cat([real, fake.detach()])), labels).backward()
        opt_d.step()
        opt_g.zero_grad()
        bce(disc(fake), torch.ones(8, 1)).backward()
        opt_g.step()


def gan_matches_ddp(iters: int) -> None:
    """Two ScheduledOptimizers (generator, discriminator) against two DDP-wrapped models."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    gen, disc = _Generator(), _Discriminator()
    ref_gen, ref_disc = _Generator(), _Discriminator()
    ref_gen.load_state_dict(gen.state_dict())
    ref_disc.load_state_dict(disc.state_dict())
    ddp_gen, ddp_disc = DDP(ref_gen), DDP(ref_disc)
    _gan_iterations(ddp_gen, ddp_disc, torch.optim.Adam(ddp_gen.parameters(), 1e-3),
                    torch.optim.Adam(ddp_disc.parameters(), 1e-3), rank, iters)
    opt_g = ScheduledOptimizer(torch.optim.Adam(gen.parameters(), 1e-3), gen, timeout_s=60)
    opt_d = ScheduledOptimizer(torch.optim.Adam(disc.parameters(), 1e-3), disc, timeout_s=60)
    _gan_iterations(gen, disc, opt_g, opt_d, rank, iters)
    opt_g.synchronize()
    opt_d.synchronize()
    _assert_same(rank, gen, ref_gen, "gan generator")
    _assert_same(rank, disc, ref_disc, "gan discriminator")
    opt_g.close()
    opt_d.close()
    print(f"rank {rank}: GAN loop matches DDP after {iters} iterations (bit-exact)", flush=True)
    dist.destroy_process_group()


def gan_horovod(iters: int) -> None:
    """The same loop under Horovod: it runs, and every rank ends with the same parameters."""
    import horovod.torch as hvd

    hvd.init()
    rank = hvd.rank()
    torch.manual_seed(rank)
    gen, disc = _Generator(), _Discriminator()
    opt_g = ScheduledOptimizer(torch.optim.Adam(gen.parameters(), 1e-3), gen,
                               backend="horovod", timeout_s=60)
    opt_d = ScheduledOptimizer(torch.optim.Adam(disc.parameters(), 1e-3), disc,
                               backend="horovod", timeout_s=60)
    _gan_iterations(gen, disc, opt_g, opt_d, rank, iters)
    opt_g.close()
    opt_d.close()
    flat = torch.cat([p.detach().reshape(-1) for m in (gen, disc) for p in m.parameters()])
    gathered = hvd.allgather(flat.unsqueeze(0), name="check")
    assert all(torch.equal(gathered[0], g) for g in gathered), "ranks differ"
    print(f"rank {rank}: GAN loop over horovod ran {iters} iterations, ranks identical",
          flush=True)


def env_settings(trace: str) -> None:
    """Settings from LEGATO_* variables (set by the test for every rank), explicit arguments
    winning; messages and updates as torch.profiler spans; the timeline written at close."""
    import os

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert os.environ["LEGATO_TIMELINE"] == trace
    torch.manual_seed(0)
    model = Net()
    opt = ScheduledOptimizer(make_optimizer("sgd", model.parameters()), model)
    assert opt.config.policy == "bytescheduler" and opt.config.partition_bytes == 64 * 1024, \
        opt.config.describe()
    assert opt._bpps == 2 and opt._timeout_s == 45.0
    loss_fn = nn.CrossEntropyLoss()
    # legato's threads send and update: the profiler records them with profile_all_threads
    every_thread = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                experimental_config=every_thread) as prof:
        for step in range(2):
            for micro in range(2):
                x, y = batch(rank, 10 * step + micro)
                loss_fn(model(x), y).backward()
            opt.step()
        opt.synchronize()
    names = {e.name for e in prof.events()}
    assert any(n.startswith("legato.msg ") for n in names), sorted(names)[:50]
    assert any(n.startswith("legato.update ") for n in names), sorted(names)[:50]
    opt.close()
    other = Net()  # an explicit argument wins over its variable
    opt2 = ScheduledOptimizer(make_optimizer("sgd", other.parameters()), other, policy="plain",
                              timeline=trace + ".second.json")
    assert opt2.config.policy == "plain", opt2.config.describe()
    opt2.close()
    print(f"rank {rank}: settings from the environment, profiler spans "
          f"{sorted(n for n in names if n.startswith('legato.'))[:2]}", flush=True)
    dist.destroy_process_group()


def crash_keeps_trace(trace: str) -> None:
    """Both ranks die without close() after a few steps: each rank's spans up to then are in
    its partial trace file, flushed as they came."""
    import os
    import time

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net()
    opt = ScheduledOptimizer(make_optimizer("sgd", model.parameters()), model, timeline=trace)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(4):
        if step == 3:
            time.sleep(1.2)  # the last step's spans flush what the first three left pending
        x, y = batch(rank, step)
        loss_fn(model(x), y).backward()
        opt.step()
    opt.synchronize()
    dist.barrier()
    print(f"rank {rank}: dying without close()", flush=True)
    os._exit(3)


def compression_matches_ddp(kind: str, policy: str, settings: dict, steps: int) -> None:
    """compression="fp16"/"bf16" against DDP with fp16_compress_hook / bf16_compress_hook."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ours, ref = _pair("sgd")
    ddp = DDP(ref)
    torch_hook = {"fp16": default_hooks.fp16_compress_hook,
                  "bf16": default_hooks.bf16_compress_hook}[kind]

    def hook(state, bucket):  # DDP refuses torch's bf16 hook by name off CUDA; gloo runs it
        return torch_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    ref_opt = make_optimizer("adam", ddp.parameters())
    opt = ScheduledOptimizer(make_optimizer("adam", ours.parameters()), ours, policy=policy,
                             compression=kind, timeout_s=60, **settings)
    _side_by_side(ddp, ref_opt, ours, opt, rank, steps, f"{kind} compression")
    opt.close()
    print(f"rank {rank}: {kind} compression ({policy}) matches DDP's {kind}_compress_hook "
          f"after {steps} steps (bit-exact)", flush=True)
    dist.destroy_process_group()
