"""legato's tensorflow adapter."""

try:
    import tensorflow  # noqa: F401
except ImportError as err:  # exercised where tensorflow is absent
    raise ImportError(
        "legato.adapters.tensorflow needs tensorflow, which is not importable here (" + str(err)
        + "); install it with `pip install 'legato[tensorflow]'`") from err

__all__: list[str] = []
