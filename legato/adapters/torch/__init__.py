"""legato's torch adapter."""

try:
    import torch  # noqa: F401
except ImportError as err:  # exercised where torch is absent
    raise ImportError(
        "legato.adapters.torch needs torch, which is not importable here (" + str(err)
        + "); install it with `pip install 'legato[torch]'`") from err

__all__: list[str] = []
