"""Policy names, defaults and the checks on their settings."""

from __future__ import annotations

import pytest

from legato.core.errors import ConfigError
from legato.core.scheduler.policy import (DEFAULT_CREDIT_PARTITIONS, DEFAULT_PARTITION_BYTES,
                                          resolve_config)


def test_defaults():
    fifo = resolve_config("fifo")
    assert (fifo.order, fifo.partition_bytes, fifo.credit_bytes) == ("arrival", None, None)
    prio = resolve_config("priority")
    assert (prio.order, prio.partition_bytes, prio.credit_bytes) == ("layer", None, 1)
    bs = resolve_config("bytescheduler")
    assert bs.partition_bytes == DEFAULT_PARTITION_BYTES
    assert bs.credit_bytes == DEFAULT_CREDIT_PARTITIONS * DEFAULT_PARTITION_BYTES
    assert "policy=bytescheduler" in bs.describe()


def test_explicit_settings():
    cfg = resolve_config("bytescheduler", partition_bytes=1000, credit_bytes=3000, merge_bytes=0)
    assert (cfg.partition_bytes, cfg.credit_bytes, cfg.merge_bytes) == (1000, 3000, 0)
    assert resolve_config("bytescheduler", partition_bytes=100).merge_bytes == 100


@pytest.mark.parametrize("args, match", [
    (dict(policy="lifo"), "policy='lifo' is unknown; known policies: fifo, priority"),
    (dict(policy="bytescheduler", partition_bytes=4096, credit_bytes=1024),
     r"credit_bytes=1024 is below partition_bytes=4096.*credit_bytes >= partition_bytes \(4096\)"),
    (dict(policy="bytescheduler", credit_bytes=0), "credit_bytes=0 is invalid"),
    (dict(policy="bytescheduler", partition_bytes=-5), "partition_bytes=-5 is invalid"),
    (dict(policy="fifo", credit_bytes=10), "partition_bytes and credit_bytes apply to"),
    (dict(policy="priority", partition_bytes=10), "use policy='bytescheduler' to partition"),
])
def test_bad_settings(args, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(**args)


@pytest.mark.parametrize("config", [
    resolve_config("bytescheduler"),
    resolve_config("bytescheduler", partition_bytes=3 << 20, credit_bytes=9 << 20,
                   merge_bytes=4096),
    resolve_config("priority"), resolve_config("priority", credit_bytes=2 << 20),
    resolve_config("fifo"), resolve_config("plain"), resolve_config("plain", merge_bytes=1)])
def test_a_settings_keywords_resolve_to_it_again(config):
    """SchedulerConfig.settings(): what a benchmark passes to run the setting a check chose."""
    assert resolve_config(**config.settings()) == config
