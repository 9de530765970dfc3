"""The on-disk cache of measured costs: one section per machine, entries with their spread, safe
against concurrent writers.

A cost measured on one machine says nothing about another, nor about the same machine under
another onnxruntime or thread count. So entries live in a section keyed by the machine: CPU
model, logical cores, the cores this process may use, the L2 and L3 sizes, onnxruntime's
version, the optimization level and the intra-op threads (`machine_key`). Each entry keeps the
median, its relative spread (interquartile range over median), the number of samples, when it
was measured and how often a whole-model A/B has confirmed it, so a noisy sample can be told
from a steady one and re-measured.

Writers take an exclusive `flock` on a lock file beside the cache, read the file again, merge
their entries in (newer measurements win, invalidations remove), and replace the file
atomically; readers never see a partial file and two processes never lose each other's
entries. A file that cannot be read (corrupt, another format) is ignored and rewritten.

File: `~/.cache/legato/op_costs.json` (`LEGATO_COST_CACHE` moves it; `LEGATO_NO_COST_CACHE=1`,
`optimize(use_cache=False)` or `legato rewrite --no-cache` bypass it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from legato.core._files import atomic_json

__all__ = ["CostCache", "Entry", "FORMAT", "cache_disabled", "default_cache_path",
           "machine_info", "machine_key"]

FORMAT = "legato.rewrite.costs/2"


@dataclasses.dataclass
class Entry:
    """One measured cost: the median in seconds, the relative spread (IQR / median), samples."""

    seconds: float
    spread: float
    samples: int
    measured_at: float = 0.0
    confirmed: int = 0             # whole-model A/Bs that agreed with predictions using it

    def to_json(self) -> dict:
        return {"s": self.seconds, "spread": round(self.spread, 4), "n": self.samples,
                "at": self.measured_at, "ok": self.confirmed}

    @classmethod
    def from_json(cls, d: Any) -> "Entry | None":
        try:
            return cls(float(d["s"]), float(d.get("spread", 1.0)), int(d.get("n", 0)),
                       float(d.get("at", 0.0)), int(d.get("ok", 0)))
        except (KeyError, TypeError, ValueError):
            return None


def default_cache_path() -> Path:
    return Path(os.environ.get("LEGATO_COST_CACHE",
                               Path.home() / ".cache" / "legato" / "op_costs.json"))


def cache_disabled() -> bool:
    """`LEGATO_NO_COST_CACHE` set to anything but "" or "0"."""
    return os.environ.get("LEGATO_NO_COST_CACHE", "") not in ("", "0")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_size(level: int) -> int:
    """Bytes of the data or unified cache at `level` that cpu0 sees (0 when unknown)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            if int((index / "level").read_text()) != level:
                continue
            if (index / "type").read_text().strip() == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
            return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        pass
    return 0


@functools.lru_cache(maxsize=None)
def machine_info() -> dict[str, Any]:
    """What a cost depends on besides the operator: the CPU and what this process may use."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:                      # not on Linux
        usable = os.cpu_count() or 1
    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 1, "usable_cores": usable,
            "l2_bytes": _cache_size(2), "l3_bytes": _cache_size(3),
            "system": platform.system(), "arch": platform.machine()}


def machine_key(*, ort_version: str, level: str, threads: int) -> str:
    """The section a cost belongs to: machine, onnxruntime version, level and threads."""
    info = machine_info()
    blob = json.dumps([info, ort_version, level, threads], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class CostCache:
    """Entries of one machine section, loaded from and merged into the cache file.

    Args:
        path: the cache file, or None for a cache in memory only.
        section: `machine_key(...)`.
        describe: stored beside the section so a person can tell the sections apart.
    """

    def __init__(self, path: str | os.PathLike | None, section: str,
                 describe: dict[str, Any] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.section = section
        self.describe = describe or {}
        self._entries: dict[str, Entry] = {}
        self._dirty: dict[str, Entry] = {}
        self._dropped: set[str] = set()
        self._lock = threading.Lock()
        self.from_disk: set[str] = set()        # keys read from the file, not measured here
        if self.path is not None:
            for key, entry in self._read().items():
                self._entries[key] = entry
                self.from_disk.add(key)

    # ------------------------------------------------------------------ reading

    def _read_file(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("format") == FORMAT else {}

    def _read(self) -> dict[str, Entry]:
        raw = self._read_file().get("machines", {}).get(self.section, {}).get("entries", {})
        out = {}
        for key, value in raw.items() if isinstance(raw, dict) else ():
            entry = Entry.from_json(value)
            if entry is not None and entry.seconds >= 0:
                out[key] = entry
        return out

    def get(self, key: str) -> Entry | None:
        with self._lock:
            return self._entries.get(key)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    # ------------------------------------------------------------------ writing

    def put(self, key: str, entry: Entry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._dirty[key] = entry
            self._dropped.discard(key)
            self.from_disk.discard(key)

    def confirm(self, keys: Iterator[str] | list[str]) -> None:
        """A whole-model A/B agreed with a prediction that used these entries."""
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.confirmed += 1
                    self._dirty[key] = entry

    def invalidate(self, keys: Iterator[str] | list[str]) -> int:
        """Forget these entries here and, at the next `save`, in the file; returns how many."""
        n = 0
        with self._lock:
            for key in keys:
                if self._entries.pop(key, None) is not None:
                    n += 1
                self._dirty.pop(key, None)
                self._dropped.add(key)
                self.from_disk.discard(key)
        return n

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        import fcntl

        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def save(self) -> bool:
        """Merge this process's new entries and invalidations into the file; False when there
        was nothing to write or no file."""
        with self._lock:
            if self.path is None or (not self._dirty and not self._dropped):
                return False
            dirty, dropped = dict(self._dirty), set(self._dropped)
        with self._file_lock():
            data = self._read_file() or {"format": FORMAT, "machines": {}}
            machines = data.setdefault("machines", {})
            section = machines.setdefault(self.section, {})
            section["machine"] = self.describe
            entries = section.setdefault("entries", {})
            for key in dropped:
                entries.pop(key, None)
            for key, entry in dirty.items():
                old = Entry.from_json(entries.get(key))
                if old is not None and old.measured_at > entry.measured_at:
                    continue                     # another process measured it later
                entries[key] = entry.to_json()
            section["updated"] = round(time.time(), 1)
            atomic_json(self.path, data, indent=None)
        with self._lock:
            for key in dirty:
                self._dirty.pop(key, None)
            self._dropped -= dropped
        return True
