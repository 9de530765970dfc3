"""legato's torch adapter: ScheduledOptimizer and its communication backends, the pipeline
profiler, the pipeline-parallel trainer, and the `torch.compile(backend="legato")` graph
rewriter (registered on import)."""

from legato._extras import require

require("torch", what="legato.adapters.torch")

# importing compile registers the backend; its configure() is legato.adapters.torch.compile's
from legato.adapters.torch.compile import (  # noqa: E402
    last_compiles,
    last_reports,
    legato_backend,
)
from legato.adapters.torch.ddp_hook import (  # noqa: E402
    ScheduledCommHook,
    register_scheduled_hook,
)
from legato.adapters.torch.optimizer import ScheduledOptimizer  # noqa: E402
from legato.adapters.torch.pipeline import (  # noqa: E402
    PipelineCommError,
    PipelineTrainer,
    VersionRecord,
    layer_ids,
    microbatch_rng,
    microbatch_seed,
    share_plan,
    split_model,
)
from legato.adapters.torch.pipeline_profile import profile_pipeline  # noqa: E402
from legato.adapters.torch.torch_pipelining import (  # noqa: E402
    TorchPipeline,
    read_torch_schedule,
    torch_pipeline,
)

__all__ = ["PipelineCommError", "PipelineTrainer", "ScheduledCommHook", "ScheduledOptimizer",
           "TorchPipeline", "VersionRecord", "last_compiles", "last_reports", "layer_ids",
           "legato_backend", "microbatch_rng", "microbatch_seed", "profile_pipeline",
           "read_torch_schedule", "register_scheduled_hook", "share_plan", "split_model",
           "torch_pipeline"]
