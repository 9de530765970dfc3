"""legato's tensorflow adapter: a scheduled optimizer for Keras optimizers (gradients over
Horovod's TensorFlow ops or legato's gloo transport), the pipeline profiler, and graph rewriting
of functions and SavedModels (tf2onnx, legato's optimizer, onnxruntime)."""

from legato._extras import require

require("tensorflow", what="legato.adapters.tensorflow")

from legato.adapters.tensorflow.compile import (  # noqa: E402
    OptimizedFunction,
    last_compiles,
    last_reports,
    optimize_function,
    optimize_saved_model,
)
from legato.adapters.tensorflow.optimizer import ScheduledOptimizer  # noqa: E402
from legato.adapters.tensorflow.pipeline_profile import profile_pipeline  # noqa: E402

__all__ = ["OptimizedFunction", "last_compiles", "last_reports", "optimize_function",
           "optimize_saved_model", "profile_pipeline", "ScheduledOptimizer"]
