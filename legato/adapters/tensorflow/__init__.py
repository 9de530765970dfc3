"""legato's tensorflow adapter: the pipeline profiler."""

from legato.adapters._require import require_framework

require_framework("tensorflow")

from legato.adapters.tensorflow.pipeline_profile import profile_pipeline  # noqa: E402

__all__ = ["profile_pipeline"]
