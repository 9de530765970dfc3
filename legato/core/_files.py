"""Writing files so that a reader never sees a partial one and a failure leaves the old file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_json", "atomic_write", "read_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False,
                 suffix: str = "") -> Path:
    """Call `write(f)` on a temporary file beside `path`, then rename it over `path`.

    The folder is created; on any failure the temporary file is removed and `path` is left as it
    was. `suffix` keeps an extension some writers look at (matplotlib: ".png")."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_json(path: str | os.PathLike, data: Any, *, indent: int | None = 1) -> Path:
    """Write `data` as JSON (with a final newline) atomically."""
    def write(f: IO) -> None:
        json.dump(data, f, indent=indent)
        f.write("\n")

    return atomic_write(path, write)


def read_text(path: str | os.PathLike, error: type[Exception], *, what: str, kind: str) -> str:
    """The UTF-8 text of a file a user named, or `error` with one line naming the file: it
    cannot be read ("cannot read {what}{path}: ..."), or it is not text (`kind` says what it
    should be)."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"cannot read {what}{p}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise error(f"{p} is not a text file (byte {err.start} is not UTF-8); {kind}") from err
