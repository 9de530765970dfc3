"""legato's mxnet adapter: communication scheduling over the dist_sync kvstore
(ScheduledTrainer), the pipeline profiler, and graph rewriting of Gluon blocks (mx.onnx export,
legato's optimizer, onnxruntime)."""

from legato._extras import require

require("mxnet", what="legato.adapters.mxnet")

from legato.adapters.mxnet.compile import (  # noqa: E402
    OptimizedBlock,
    last_compiles,
    last_reports,
    optimize_block,
)
from legato.adapters.mxnet.comm import ScheduledKVStore  # noqa: E402
from legato.adapters.mxnet.pipeline_profile import profile_pipeline  # noqa: E402
from legato.adapters.mxnet.optimizer import ScheduledTrainer  # noqa: E402

__all__ = ["OptimizedBlock", "ScheduledKVStore", "ScheduledTrainer", "last_compiles",
           "last_reports", "optimize_block", "profile_pipeline"]
