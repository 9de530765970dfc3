"""legato's exceptions. Each says what failed, the values involved, and what to do."""

__all__ = ["LegatoError", "BackendUnavailable", "ConfigError"]


class LegatoError(Exception):
    """Base class of every error legato raises on purpose."""


class BackendUnavailable(LegatoError):
    """A framework, library or device that the requested feature needs is not usable here."""


class ConfigError(LegatoError, ValueError):
    """An argument or setting is invalid; the message names the value and the fix."""
