"""legato's torch adapter."""

from legato.adapters._require import require_framework

require_framework("torch")

__all__: list[str] = []
