"""Scheduler settings from `LEGATO_*` environment variables, for scripts that cannot change.

Horovod (HOROVOD_FUSION_THRESHOLD, HOROVOD_TIMELINE) and ByteScheduler (BYTESCHEDULER_*) are
configured this way: a launcher sets the variables on every rank, the training script stays
as it was. An argument given explicitly to the optimizer wins over its variable; a variable
wins over the default. A value that does not parse is a ConfigError naming the variable.

    LEGATO_POLICY=bytescheduler|priority|fifo|plain
    LEGATO_PARTITION_BYTES, LEGATO_CREDIT_BYTES, LEGATO_MERGE_BYTES   bytes: 4194304, 4MiB, 64KiB
    LEGATO_TUNE=1 | 0 | a JSON object of TuneSettings fields ({"trials": 20})
    LEGATO_TIMELINE=trace.json        (a Chrome trace of every rank, written on rank 0)
    LEGATO_TIMEOUT_S=300
    LEGATO_BACKWARD_PASSES_PER_STEP=4
    LEGATO_COMPRESSION=fp16 | bf16 | none
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable, Mapping

from legato.core.errors import ConfigError

__all__ = ["DEFAULTS", "VARIABLES", "adapter_settings", "parse_bytes", "resolve_settings",
           "sizes_for"]

log = logging.getLogger(__name__)


def parse_bytes(text: str) -> int:
    """'4194304', '4MiB', '4M', '64KiB', '1.5MB' -> bytes (K/M/G and KiB/MiB/GiB are powers of
    1024, KB/MB/GB of 1000)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(text)
    number, prefix, suffix = match.groups()
    power = {"": 0, "K": 1, "M": 2, "G": 3}[prefix.upper()]
    base = 1000 if suffix.upper() == "B" and power else 1024
    value = float(number) * base ** power
    if value != int(value):
        raise ValueError(text)
    return int(value)


def _tune(text: str) -> Any:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


COMPRESSIONS = ("fp16", "bf16", "none")


def _compression(text: str) -> str:
    value = text.strip().lower()
    if value not in COMPRESSIONS:
        raise ValueError(text)
    return value


DEFAULTS_MODES = ("auto", "fixed", "simulated", "fixed-or-plain")


def _defaults(text: str) -> str:
    value = text.strip().lower()
    if value not in DEFAULTS_MODES:
        raise ValueError(text)
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


# argument -> (variable, parser, what a valid value looks like)
VARIABLES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "policy": ("LEGATO_POLICY", str.strip, "bytescheduler, priority, fifo or plain"),
    "partition_bytes": ("LEGATO_PARTITION_BYTES", parse_bytes, "bytes, e.g. 4194304 or 4MiB"),
    "credit_bytes": ("LEGATO_CREDIT_BYTES", parse_bytes, "bytes, e.g. 16MiB"),
    "merge_bytes": ("LEGATO_MERGE_BYTES", parse_bytes, "bytes, e.g. 64KiB"),
    "tune": ("LEGATO_TUNE", _tune, '1, 0 or a JSON object such as {"trials": 20}'),
    "timeline": ("LEGATO_TIMELINE", str.strip, "a file path"),
    "timeout_s": ("LEGATO_TIMEOUT_S", _positive_float, "seconds, e.g. 300"),
    "backward_passes_per_step": ("LEGATO_BACKWARD_PASSES_PER_STEP", _positive_int,
                                 "a whole number, 1 or more"),
    "compression": ("LEGATO_COMPRESSION", _compression, "fp16, bf16 or none"),
    "defaults": ("LEGATO_DEFAULTS", _defaults, "auto, fixed, simulated or fixed-or-plain"),
}


def resolve_settings(given: Mapping[str, Any], defaults: Mapping[str, Any],
                     environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Each setting from `given` (None: not given), else its LEGATO_* variable, else
    `defaults`. Returns the settings and which variables were used ("LEGATO_POLICY=fifo")."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    used: list[str] = []
    for name, default in defaults.items():
        value = given.get(name)
        if value is None and name in VARIABLES:
            variable, parse, valid = VARIABLES[name]
            text = env.get(variable)
            if text is not None and text.strip() != "":
                try:
                    value = parse(text)
                except ValueError:
                    raise ConfigError(f"{variable}={text!r} is invalid; give {valid}, or unset "
                                      "it") from None
                used.append(f"{variable}={text.strip()}")
        out[name] = default if value is None else value
    return out, used


# The optimizers' defaults where neither an argument nor a variable gives a setting.
DEFAULTS: dict[str, Any] = {
    "policy": "bytescheduler", "partition_bytes": None, "credit_bytes": None,
    "merge_bytes": None, "tune": False, "timeline": None, "timeout_s": 300.0,
    "backward_passes_per_step": 1, "compression": "none", "defaults": "auto",
}

# The sizes each policy takes (resolve_config refuses the others).
_SIZES = {"bytescheduler": ("partition_bytes", "credit_bytes", "merge_bytes"),
          "priority": ("credit_bytes", "merge_bytes"), "fifo": ("merge_bytes",),
          "plain": ("merge_bytes",)}


def sizes_for(policy: str, settings: Mapping[str, Any],
              given: Mapping[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """(partition, credit, merge) bytes for `policy`. Sizes that came from variables set for
    every job (LEGATO_PARTITION_BYTES with policy='plain') are dropped where the policy has
    no such size; given explicitly, resolve_config refuses them with the reason."""
    given = given or {}
    takes = _SIZES.get(policy, ("partition_bytes", "credit_bytes", "merge_bytes"))
    return tuple(settings[name] if name in takes or given.get(name) is not None else None
                 for name in ("partition_bytes", "credit_bytes", "merge_bytes"))


def adapter_settings(adapter: str, *, environ: Mapping[str, str] | None = None,
                     **given: Any) -> tuple[dict[str, Any], list[str]]:
    """For an adapter whose wrapper takes some of the settings in DEFAULTS (the TensorFlow and
    MXNet wrappers): each of `given` from its argument (None: not given), else its LEGATO_*
    variable, else the default; the sizes resolved for the policy (`sizes_for`). A LEGATO_*
    variable of a setting the adapter lacks is not silently dropped: the warning names the
    variable and the adapter. Returns (the settings by name, the variables used)."""
    env = os.environ if environ is None else environ
    unknown = [name for name in given if name not in DEFAULTS]
    if unknown:
        raise TypeError(f"adapter_settings: unknown settings {unknown}")
    settings, used = resolve_settings(given, {k: DEFAULTS[k] for k in given}, env)
    for name, (variable, _, _) in VARIABLES.items():
        if name not in given and env.get(variable, "").strip():
            log.warning("%s is set, but the %s adapter has no %s setting yet: ignored",
                        variable, adapter, name)
    if "policy" in settings:
        settings["partition_bytes"], settings["credit_bytes"], settings["merge_bytes"] = \
            sizes_for(settings["policy"], settings, given)
    return settings, used
