"""legato's tensorflow adapter."""

from legato.adapters._require import require_framework

require_framework("tensorflow")

__all__: list[str] = []
