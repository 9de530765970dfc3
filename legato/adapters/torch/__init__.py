"""legato's torch adapter: ScheduledOptimizer and its communication backends."""

from legato.adapters._require import require_framework

require_framework("torch")

from legato.adapters.torch.optimizer import ScheduledOptimizer  # noqa: E402

__all__ = ["ScheduledOptimizer"]
