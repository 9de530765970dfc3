"""What the framework compile wrappers (`OptimizedFunction`, `OptimizedBlock`) share: the
record of the compile, and falling back to the framework with one warning."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["CompiledWithFallback"]


class CompiledWithFallback:
    """A compiled callable whose `record` (a `CompileRecord`) says where it runs and why.

    Subclasses set `framework` (the record's `runs_on` after a fallback), `label` (its name in
    the warning) and `_log`, and keep `runner` (None once fallen back)."""

    framework = ""
    label = ""
    _log = logging.getLogger(__name__)
    record: Any
    runner: Any

    @property
    def runs_on(self) -> str:
        return self.record.runs_on

    @property
    def reason(self) -> str:
        return self.record.reason

    @property
    def report(self) -> Any:
        return self.record.report

    @property
    def model(self) -> Any:
        """The ONNX model onnxruntime runs (None after a fallback)."""
        return self.record.model if self.runner is not None else None

    def _fall_back(self, reason: str) -> None:
        self.runner = None
        self.record.runs_on, self.record.reason = self.framework, reason
        self._log.warning("[legato %s] runs in %s: %s", self.record.name, self.label, reason)
