"""The pipeline section of `legato demo`: profile, plan, simulate, then run 1F1B on two stages.

`run_demo()` launches `worker` as 2 gloo ranks on 127.0.0.1. Both ranks profile the model at
once (they share this machine's cores, as the pipeline will), rank 0's profile is planned for
2 workers as a straight pipeline, the plan's 1F1B schedule is simulated, and then the real
runtime trains it; rank 0 prints the prediction next to the measurement.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

__all__ = ["run_demo", "worker"]

MICROBATCHES = 4
BATCH = 64


def _model():
    import torch.nn as nn

    layers, c = [], 3
    for out in (32, 64, 64):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def worker(steps: int, gantt: str) -> None:
    """One rank of the demo (launched by run_demo)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from legato.adapters.torch import PipelineTrainer, profile_pipeline
    from legato.core.pipeline import Link, LayerProfile, plan
    from legato.core.pipeline.predict import predict

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    mb = BATCH // MICROBATCHES

    def sgd(params):
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)

    prof = profile_pipeline(model, x[:mb], loss_fn=lambda out: F.cross_entropy(out, y[:mb]),
                            optimizer=sgd(model.parameters()), repeats=5, warmup=2)
    box = [prof.to_json() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    prof = LayerProfile.from_json(box[0])
    the_plan = plan(prof, 2, bandwidth="1GB/s", mode="paper", straight=True)
    pred = predict(prof, the_plan, "1f1b", microbatches=MICROBATCHES, link=Link(1e-4, 1e9),
                   fraction=1.0)
    trainer = PipelineTrainer(model, the_plan, example_inputs=x, loss_fn=F.cross_entropy,
                              optimizer=sgd, schedule="1f1b", microbatches=MICROBATCHES)
    times, losses = [], []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        loss = trainer.step(x if trainer.is_first else None, y if trainer.is_last else None)
        dist.barrier()
        times.append(time.perf_counter() - t0)
        if loss is not None:
            losses.append(float(loss))
    spans = trainer.timeline(gather=True)
    box = [losses]
    dist.broadcast_object_list(box, src=1)      # the last stage computed the losses
    if rank == 0:
        print(f"profile: {len(prof.nodes)} layers, {prof.compute_s * 1e3:.1f} ms forward+"
              f"backward per microbatch of {mb} (calibrated to whole passes)")
        print(the_plan.describe())
        print(f"  (times are for one profiled batch: a microbatch of {mb})")
        measured = statistics.median(times[1:])
        r = pred.result
        print(f"1F1B, {MICROBATCHES} microbatches: simulated {r.makespan_s * 1e3:.1f} ms per "
              f"step (bubble {r.bubble_fraction:.0%}); measured {measured * 1e3:.1f} ms "
              f"(median of {len(times) - 1} steps): prediction {r.makespan_s / measured - 1:+.0%}")
        print("loss by step: " + " ".join(f"{v:.3f}" for v in box[0]))
        from legato.core.pipeline import SimResult

        SimResult("1f1b (measured)", max(s.end_s for s in spans), {}, 0.0, {}, tuple(spans),
                  r.report).gantt(gantt, title="1F1B on two stages, measured (last step)")
        print(f"Gantt chart of the measured step: {gantt}")
    dist.destroy_process_group()


def run_demo(steps: int = 6) -> bool:
    """Launch the two ranks; True when they succeeded."""
    import os

    from legato.launch import run_torch_job

    gantt = str(Path(os.environ.get("TMPDIR", "/tmp")) / "legato-demo-pipeline.png")
    job = run_torch_job(f"{__file__}:worker", 2, args=[steps, gantt], timeout_s=300,
                        check=False)
    out = job.rank(0).stdout.strip()
    if out:
        print(out)
    if not job.ok:
        print(job.summary())
    return job.ok and Path(gantt).exists()
