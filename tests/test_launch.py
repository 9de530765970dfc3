"""The job launchers of legato.launch, each proven with a real collective."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from legato.launch import (JobFailed, _child_main, free_port, run_horovod_job, run_mxnet_ps_job,
                           run_torch_job)

WORKERS = str(Path(__file__).parent / "_workers.py")


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_torch_gloo_allreduce_two_ranks():
    result = run_torch_job(f"{WORKERS}:torch_allreduce", 2, args=[2], timeout_s=90)
    assert result.ok
    for r in range(2):
        assert f"rank {r}: all-reduce ok (3.0)" in result.rank(r).stdout


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_torch_failed_rank_stops_job_and_shows_its_error():
    start = time.monotonic()
    with pytest.raises(JobFailed) as info:
        run_torch_job(f"{WORKERS}:fail_on_rank", 2, args=[1], timeout_s=90, grace_s=3)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "planted failure on rank 1" in message
    assert "rank 1: exit 1" in message
    # rank 0 blocks in all_reduce: gloo may notice the dead peer itself, or the launcher kills
    # it after the grace period; either way it is reported and the job does not hang.
    rank0 = info.value.result.rank(0)
    assert not rank0.ok
    assert elapsed < 60, f"job took {elapsed:.1f} s to fail"


@pytest.mark.timeout(60)
def test_timeout_kills_every_rank():
    start = time.monotonic()
    with pytest.raises(JobFailed) as info:
        run_torch_job(f"{WORKERS}:sleep_forever", 2, timeout_s=3)
    assert time.monotonic() - start < 20
    for r in range(2):
        proc = info.value.result.rank(r)
        assert proc.returncode is None and "job timeout of 3 s" in proc.killed_reason
        assert "sleeping" in proc.stdout
    assert "killed (job timeout of 3 s)" in str(info.value)


@pytest.mark.timeout(60)
def test_rank_environment_matches_torchrun():
    result = run_torch_job(f"{WORKERS}:print_env", 3,
                           args=["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"], timeout_s=30)
    for r in range(3):
        out = result.rank(r).stdout
        assert f"RANK={r}\n" in out and "WORLD_SIZE=3" in out and f"LOCAL_RANK={r}" in out
        assert "MASTER_ADDR=127.0.0.1" in out


def test_bad_target_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="file.py:function"):
        run_torch_job("no_colon", 2)
    with pytest.raises(ValueError, match="does not exist"):
        run_torch_job(str(tmp_path / "missing.py") + ":f", 2)
    with pytest.raises(ValueError, match="nprocs=0"):
        run_torch_job(f"{WORKERS}:print_env", 0)


def test_child_main_reports_exceptions(tmp_path, capsys):
    script = tmp_path / "boom.py"
    script.write_text("def f(x):\n    raise KeyError(x)\n")
    assert _child_main([f"{script}:f", "[\"key\"]"]) == 1
    assert "KeyError: 'key'" in capsys.readouterr().err


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.horovod
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_horovod_torch_allreduce_two_ranks():
    result = run_horovod_job(f"{WORKERS}:horovod_torch_allreduce", 2, timeout_s=200)
    for r in range(2):
        # per-rank output without horovodrun's "[r]<stdout>:" prefixes
        assert result.rank(r).stdout.startswith(f"rank {r}/2: horovod torch all-reduce ok")


@pytest.mark.horovod
@pytest.mark.tensorflow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_horovod_tensorflow_allreduce_two_ranks():
    result = run_horovod_job(f"{WORKERS}:horovod_tensorflow_allreduce", 2, timeout_s=200)
    for r in range(2):
        assert f"rank {r}/2: horovod tensorflow all-reduce ok" in result.rank(r).stdout


@pytest.mark.horovod
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_horovod_failed_rank_is_reported():
    start = time.monotonic()
    with pytest.raises(JobFailed) as info:
        run_horovod_job(f"{WORKERS}:horovod_fail_on_rank", 2, args=[1], timeout_s=150)
    assert "planted failure on horovod rank 1" in str(info.value)
    assert not info.value.result.rank(1).ok
    assert time.monotonic() - start < 120


@pytest.mark.horovod
@pytest.mark.timeout(120)
def test_horovod_job_timeout_kills_everything():
    with pytest.raises(JobFailed) as info:
        run_horovod_job(f"{WORKERS}:sleep_forever", 2, timeout_s=20)
    assert "job timeout of 20 s" in str(info.value)
    # no worker of the job survives its launcher
    import subprocess

    leftover = subprocess.run(["pgrep", "-f", "_workers.py:sleep_forever"],
                              capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes left running: {leftover}"


@pytest.mark.mxnet
@pytest.mark.timeout(180)
def test_mxnet_parameter_server_push_pull():
    result = run_mxnet_ps_job(f"{WORKERS}:mxnet_kvstore_push_pull", 2, num_servers=1,
                              args=["dist_sync", 3], timeout_s=150)
    outputs = [p.stdout for p in result.procs if p.name.startswith("worker")]
    assert len(outputs) == 2
    for out in outputs:
        assert "kvstore dist_sync push/pull ok over 3 steps" in out


@pytest.mark.mxnet
@pytest.mark.timeout(120)
def test_mxnet_job_times_out_cleanly():
    with pytest.raises(JobFailed) as info:
        run_mxnet_ps_job(f"{WORKERS}:sleep_forever", 1, timeout_s=10)
    assert "job timeout of 10 s" in str(info.value)
