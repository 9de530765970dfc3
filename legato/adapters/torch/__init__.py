"""legato's torch adapter: ScheduledOptimizer and its communication backends, the pipeline
profiler and the pipeline-parallel trainer."""

from legato.adapters._require import require_framework

require_framework("torch")

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
    split_model,
)
from legato.adapters.torch.pipeline_profile import profile_pipeline  # noqa: E402

__all__ = ["PipelineCommError", "PipelineTrainer", "ScheduledCommHook", "ScheduledOptimizer",
           "VersionRecord", "layer_ids", "microbatch_rng", "microbatch_seed",
           "profile_pipeline", "register_scheduled_hook", "split_model"]
