"""legato's mxnet adapter: the pipeline profiler."""

from legato.adapters._require import require_framework

require_framework("mxnet")

from legato.adapters.mxnet.pipeline_profile import profile_pipeline  # noqa: E402

__all__ = ["profile_pipeline"]
