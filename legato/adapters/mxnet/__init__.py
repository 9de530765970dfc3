"""legato's mxnet adapter."""

try:
    import mxnet  # noqa: F401
except ImportError as err:  # exercised where mxnet is absent
    raise ImportError(
        "legato.adapters.mxnet needs mxnet, which is not importable here (" + str(err)
        + "); install it with `pip install 'legato[mxnet]'`"
        + "; mxnet 1.9.1 needs numpy<1.24, so legato keeps it in .venv-mxnet (make setup)") from err

__all__: list[str] = []
