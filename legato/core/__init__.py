"""legato's framework-agnostic core: numpy and onnx only, never torch, tensorflow or mxnet."""

from legato.core.errors import BackendUnavailable, ConfigError, LegatoError
from legato.core.stop import StopReason

__all__ = ["BackendUnavailable", "ConfigError", "LegatoError", "StopReason"]
