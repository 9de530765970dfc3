"""What is communicated: tasks (one per gradient tensor) and the chunks they are cut into.

A `CommTask` is one gradient tensor: its key (position in the model's parameter order, the
same on every rank), the layer it belongs to (its priority: front layers first) and its size.
A `ChunkPlan` turns a step's tasks into the messages actually sent:

- a task larger than `partition_bytes` is cut into pieces of at most that size, aligned to its
  element size; each piece is a view of the gradient (offset and length), never a copy;
- consecutive small tasks (each below `merge_bytes`) are merged into one message of at most
  `merge_bytes`, so that per-message latency is paid once; a merged chunk is ready when all its
  members are, and its priority is its most urgent member's.

`bucket_plan` builds DDP's buckets instead (whole tensors in reverse parameter order, the first
bucket small), which the `plain` policy sends in arrival order: legato's pass-through.

The plan is a pure function of the tasks and the two sizes, so every rank computes the same
one; `ChunkPlan.digest()` lets ranks check that they did.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Sequence

from legato.core.errors import ConfigError

__all__ = ["Chunk", "ChunkPlan", "CommTask", "Part", "bucket_plan", "make_plan"]


@dataclasses.dataclass(frozen=True)
class CommTask:
    """One gradient tensor to all-reduce.

    Args:
        key: position in the model's parameter order; identical on every rank.
        name: the parameter's name, for messages and timelines.
        layer: index of the layer in forward order; lower is more urgent.
        nbytes: size of the gradient in bytes.
        itemsize: bytes per element (partitions are cut on element boundaries).
        dtype: the element type's name; only tasks of one dtype are merged into a message.
    """

    key: int
    name: str
    layer: int
    nbytes: int
    itemsize: int = 4
    dtype: str = ""

    def __post_init__(self) -> None:
        if self.nbytes < 0 or self.itemsize <= 0 or self.nbytes % self.itemsize:
            raise ConfigError(f"task {self.name!r}: nbytes={self.nbytes} and itemsize="
                              f"{self.itemsize} are inconsistent; nbytes must be a non-negative "
                              "multiple of itemsize")


@dataclasses.dataclass(frozen=True)
class Part:
    """A byte range of one task's gradient: [offset, offset + nbytes)."""

    key: int
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One message: a piece of a task (one part) or several whole small tasks (merged)."""

    id: int
    layer: int
    nbytes: int
    parts: tuple[Part, ...]

    @property
    def merged(self) -> bool:
        return len(self.parts) > 1

    @property
    def keys(self) -> tuple[int, ...]:
        return tuple(p.key for p in self.parts)


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """The chunks of a step, and for each task the chunks that carry it."""

    tasks: tuple[CommTask, ...]
    chunks: tuple[Chunk, ...]
    partition_bytes: int | None
    merge_bytes: int

    def __post_init__(self) -> None:
        by_key: dict[int, list[int]] = {t.key: [] for t in self.tasks}
        for chunk in self.chunks:
            for part in chunk.parts:
                by_key[part.key].append(chunk.id)
        object.__setattr__(self, "_chunks_of", {k: tuple(v) for k, v in by_key.items()})
        object.__setattr__(self, "_task_of", {t.key: t for t in self.tasks})

    def chunks_of(self, key: int) -> tuple[int, ...]:
        """Ids of the chunks that carry task `key`."""
        return self._chunks_of[key]  # type: ignore[attr-defined]

    def task(self, key: int) -> CommTask:
        return self._task_of[key]  # type: ignore[attr-defined]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    def digest(self) -> str:
        """A short hash of the plan; equal on every rank that built the same plan."""
        h = hashlib.sha256()
        for chunk in self.chunks:
            h.update(f"{chunk.id}:{chunk.layer}:{chunk.nbytes}:".encode())
            for p in chunk.parts:
                h.update(f"{p.key},{p.offset},{p.nbytes};".encode())
        return h.hexdigest()[:16]

    def chunk_names(self, names) -> list[str]:
        """Per chunk, the names of the tensors it carries (`names[key]`), for timelines and
        profiler spans."""
        return [", ".join(names[k] for k in c.keys) for c in self.chunks]

    def describe(self) -> str:
        parts = sum(1 for c in self.chunks if not c.merged)
        merged = sum(1 for c in self.chunks if c.merged)
        return (f"{len(self.tasks)} tensors, {self.total_bytes} bytes -> {len(self.chunks)} "
                f"messages ({parts} single-tensor or partitions, {merged} merged)")


def _whole_tasks_chunk(chunk_id: int, tasks: Sequence[CommTask]) -> Chunk:
    """One message carrying `tasks` whole; its priority is its most urgent member's layer."""
    return Chunk(chunk_id, min(t.layer for t in tasks), sum(t.nbytes for t in tasks),
                 tuple(Part(t.key, 0, t.nbytes) for t in tasks))


def _check_sizes(partition_bytes: int | None, merge_bytes: int) -> None:
    if partition_bytes is not None and partition_bytes <= 0:
        raise ConfigError(f"partition_bytes={partition_bytes} is invalid; pass a positive "
                          "number of bytes, or None to send whole tensors")
    if merge_bytes < 0:
        raise ConfigError(f"merge_bytes={merge_bytes} is invalid; pass 0 (no merging) or a "
                          "positive number of bytes")
    if partition_bytes is not None and merge_bytes > partition_bytes:
        raise ConfigError(f"merge_bytes={merge_bytes} exceeds partition_bytes="
                          f"{partition_bytes}; merged messages must not be larger than "
                          "partitions")


def make_plan(tasks: Sequence[CommTask] | Iterable[CommTask], *,
              partition_bytes: int | None = None, merge_bytes: int = 0) -> ChunkPlan:
    """Cut and merge `tasks` (in parameter order) into chunks; see the module docstring.

    Merging only joins tasks that are adjacent in layer order, of one dtype and each smaller
    than `merge_bytes`; a partitioned task is never merged.
    """
    tasks = tuple(tasks)
    _check_sizes(partition_bytes, merge_bytes)
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ConfigError("task keys must be unique; got duplicates in "
                          f"{sorted(k for k in keys if keys.count(k) > 1)[:5]}")
    ordered = sorted(tasks, key=lambda t: (t.layer, t.key))
    chunks: list[Chunk] = []
    pending: list[CommTask] = []  # small tasks being merged

    def flush() -> None:
        if not pending:
            return
        chunks.append(_whole_tasks_chunk(len(chunks), pending))
        pending.clear()

    for task in ordered:
        small = merge_bytes > 0 and task.nbytes < merge_bytes
        if small:
            if (sum(t.nbytes for t in pending) + task.nbytes > merge_bytes
                    or (pending and pending[0].dtype != task.dtype)):
                flush()
            pending.append(task)
            continue
        flush()
        if partition_bytes is None or task.nbytes <= partition_bytes:
            chunks.append(Chunk(len(chunks), task.layer, task.nbytes,
                                (Part(task.key, 0, task.nbytes),)))
            continue
        step = max(task.itemsize, partition_bytes - partition_bytes % task.itemsize)
        for offset in range(0, task.nbytes, step):
            size = min(step, task.nbytes - offset)
            chunks.append(Chunk(len(chunks), task.layer, size, (Part(task.key, offset, size),)))
    flush()
    return ChunkPlan(tasks, tuple(chunks), partition_bytes, merge_bytes)


# DDP's defaults (torch.nn.parallel.DistributedDataParallel: bucket_cap_mb=25, and a first
# bucket of 1 MiB so that communication starts early in backward).
DDP_BUCKET_BYTES = 25 * (1 << 20)
DDP_FIRST_BUCKET_BYTES = 1 << 20


def bucket_plan(tasks: Sequence[CommTask] | Iterable[CommTask], *,
                bucket_bytes: int = DDP_BUCKET_BYTES,
                first_bucket_bytes: int = DDP_FIRST_BUCKET_BYTES) -> ChunkPlan:
    """DDP's bucketing: whole tensors in reverse key order (the order backward usually produces
    them), a bucket closing as soon as it holds `first_bucket_bytes` (the first bucket) or
    `bucket_bytes` (the others), as DDP's `_compute_bucket_assignment_by_size` does. Nothing is
    partitioned.
    """
    tasks = tuple(tasks)
    if bucket_bytes <= 0 or first_bucket_bytes <= 0:
        raise ConfigError(f"bucket sizes must be positive, got bucket_bytes={bucket_bytes}, "
                          f"first_bucket_bytes={first_bucket_bytes}")
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ConfigError("task keys must be unique; got duplicates in "
                          f"{sorted(k for k in keys if keys.count(k) > 1)[:5]}")
    chunks: list[Chunk] = []
    pending: list[CommTask] = []
    cap = first_bucket_bytes

    def flush() -> None:
        nonlocal cap
        if not pending:
            return
        chunks.append(_whole_tasks_chunk(len(chunks), pending))
        pending.clear()
        cap = bucket_bytes

    for task in sorted(tasks, key=lambda t: t.key, reverse=True):
        if pending and pending[0].dtype != task.dtype:  # DDP buckets one dtype each
            flush()
        pending.append(task)
        if sum(t.nbytes for t in pending) >= cap:
            flush()
    flush()
    return ChunkPlan(tasks, tuple(chunks), None, bucket_bytes)
