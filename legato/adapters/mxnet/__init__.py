"""legato's mxnet adapter."""

from legato.adapters._require import require_framework

require_framework("mxnet")

__all__: list[str] = []
