"""legato's torch adapter: ScheduledOptimizer and its communication backends, and the
pipeline profiler."""

from legato.adapters._require import require_framework

require_framework("torch")

from legato.adapters.torch.ddp_hook import (  # noqa: E402
    ScheduledCommHook,
    register_scheduled_hook,
)
from legato.adapters.torch.optimizer import ScheduledOptimizer  # noqa: E402
from legato.adapters.torch.pipeline_profile import profile_pipeline  # noqa: E402

__all__ = ["ScheduledCommHook", "ScheduledOptimizer", "profile_pipeline",
           "register_scheduled_hook"]
