"""Scheduling policies by name, and the settings they run with.

| policy | order of messages | tensors | window |
| --- | --- | --- | --- |
| `fifo` | arrival (the order backward produces gradients): the baseline | whole | none: everything ready starts at once |
| `priority` | layer order, front layers first | whole | one message in flight (`credit_bytes` widens it) |
| `bytescheduler` | layer order | cut into `partition_bytes` pieces; small ones merged | `credit_bytes` in flight (overshoot admission) |
| `plain` | arrival | DDP's buckets (1 MiB first, then 25 MiB) | none; and no dependency proxies: the optimizer steps once, after every bucket is in |

`plain` is the pass-through: what DDP does, for jobs where communication is already hidden
and scheduling cannot pay for itself (the tuner picks it when it measures that).

With a window, a gradient that becomes ready while a less urgent message is in flight goes
next; without one, every ready message is handed to the backend at once, which then decides.
"""

from __future__ import annotations

import dataclasses

from legato.core.errors import ConfigError
from legato.core.scheduler.plan import DDP_BUCKET_BYTES, DDP_FIRST_BUCKET_BYTES, bucket_plan, \
    make_plan

__all__ = ["POLICIES", "SchedulerConfig", "plan_for", "priority_of", "resolve_config"]

MiB = 1 << 20
KiB = 1 << 10

# Defaults for bytescheduler, from ByteScheduler's own defaults scaled to CPU links: 1 MiB
# partitions and a 4-partition window; tensors under 64 KiB are merged.
DEFAULT_PARTITION_BYTES = 1 * MiB
DEFAULT_CREDIT_PARTITIONS = 4
DEFAULT_MERGE_BYTES = 64 * KiB

POLICIES = ("fifo", "priority", "bytescheduler", "plain")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Resolved settings: what the scheduler actually runs with.

    `credit_bytes` None means no window; `order` is "arrival" or "layer". For `plain`,
    `merge_bytes` is the bucket size.
    """

    policy: str
    partition_bytes: int | None
    credit_bytes: int | None
    merge_bytes: int
    order: str

    def settings(self) -> dict:
        """The wrappers' keyword arguments that resolve to this setting again (policy and the
        sizes it takes): to run a setting a tuner or a check chose, without choosing again."""
        sizes = {"partition_bytes": self.partition_bytes, "credit_bytes": self.credit_bytes}
        return {"policy": self.policy, "merge_bytes": self.merge_bytes,
                **{k: v for k, v in sizes.items() if v is not None}}

    def describe(self) -> str:
        def size(n: int | None) -> str:
            return "none" if n is None else f"{n / MiB:g} MiB" if n >= MiB else f"{n} B"
        return (f"policy={self.policy} order={self.order} partition={size(self.partition_bytes)}"
                f" credit={size(self.credit_bytes)} merge={size(self.merge_bytes)}")


def resolve_config(policy: str = "bytescheduler", *, partition_bytes: int | None = None,
                   credit_bytes: int | None = None, merge_bytes: int | None = None,
                   largest_tensor_bytes: int = 0) -> SchedulerConfig:
    """Fill in a policy's defaults and check the combination; ConfigError names the fix."""
    if policy not in POLICIES:
        raise ConfigError(f"policy={policy!r} is unknown; known policies: {', '.join(POLICIES)}")
    for name, value in (("partition_bytes", partition_bytes), ("credit_bytes", credit_bytes),
                        ("merge_bytes", merge_bytes)):
        if value is not None and (not isinstance(value, int) or value < 0 or
                                  (value == 0 and name != "merge_bytes")):
            raise ConfigError(f"{name}={value!r} is invalid; pass a positive number of bytes "
                              "or None for the policy's default")
    if policy == "fifo":
        if partition_bytes is not None or credit_bytes is not None:
            raise ConfigError("policy='fifo' sends whole tensors as they arrive, with no window;"
                              " partition_bytes and credit_bytes apply to 'priority' and "
                              "'bytescheduler'")
        return SchedulerConfig("fifo", None, None, merge_bytes or 0, "arrival")
    if policy == "plain":
        if partition_bytes is not None or credit_bytes is not None:
            raise ConfigError("policy='plain' sends DDP's buckets as they fill, with no window;"
                              " partition_bytes and credit_bytes apply to 'priority' and "
                              "'bytescheduler'")
        return SchedulerConfig("plain", None, None, merge_bytes or DDP_BUCKET_BYTES, "arrival")
    if policy == "priority":
        if partition_bytes is not None:
            raise ConfigError("policy='priority' sends whole tensors; use "
                              "policy='bytescheduler' to partition them")
        # One message in flight: admit only on an idle link (overshoot with 1 byte of credit).
        return SchedulerConfig("priority", None, credit_bytes or 1, merge_bytes or 0, "layer")
    partition = partition_bytes or DEFAULT_PARTITION_BYTES
    credit = credit_bytes or DEFAULT_CREDIT_PARTITIONS * partition
    if credit < partition:
        raise ConfigError(f"credit_bytes={credit} is below partition_bytes={partition}: the "
                          "window could not hold one partition; pass credit_bytes >= "
                          f"partition_bytes ({partition})")
    merge = DEFAULT_MERGE_BYTES if merge_bytes is None else merge_bytes
    merge = min(merge, partition)
    return SchedulerConfig("bytescheduler", partition, credit, merge, "layer")


def priority_of(config: SchedulerConfig, chunk, arrival_index: int) -> int:
    """A ready chunk's queue priority: its arrival index (fifo) or its layer (lower first)."""
    return arrival_index if config.order == "arrival" else chunk.layer


def plan_for(config: SchedulerConfig, tasks):
    """The chunk plan `config` sends `tasks` with (every rank computes the same one)."""
    if config.policy == "plain":
        return bucket_plan(tasks, bucket_bytes=config.merge_bytes,
                           first_bucket_bytes=min(DDP_FIRST_BUCKET_BYTES, config.merge_bytes))
    return make_plan(tasks, partition_bytes=config.partition_bytes,
                     merge_bytes=config.merge_bytes)
