"""ScheduledTrainer over MXNet's real parameter server (dist_sync): one scheduler, one server and
two workers on 127.0.0.1 per job (legato.launch.run_mxnet_ps_job). Runs in .venv-mxnet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.mxnet, pytest.mark.distributed]

mx = pytest.importorskip("mxnet", reason="mxnet lives in .venv-mxnet")

from mxnet import gluon  # noqa: E402

from legato.adapters.mxnet import ScheduledTrainer  # noqa: E402
from legato.core.errors import ConfigError  # noqa: E402
from legato.launch import run_mxnet_ps_job  # noqa: E402

WORKERS = str(Path(__file__).parent / "_kvstore_workers_mx.py")
# Dense(256) (1 MiB) is cut into 16 partitions, Dense(64) (64 KiB) is exactly one; the biases
# and the last layer are merged.
BS = {"partition_bytes": 64 * 1024, "merge_bytes": 4096}


def lines(result, prefix: str) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for p in result.procs
            for line in p.stdout.splitlines() if line.startswith(prefix + " ")]


def job(func: str, *args, workers: int = 2, timeout_s: float = 90):
    return run_mxnet_ps_job(f"{WORKERS}:{func}", workers, args=list(args), timeout_s=timeout_s,
                            python=sys.executable)


# -- against gluon.Trainer(kvstore="dist_sync") -------------------------------------------------
@pytest.mark.timeout(120)
def test_sgd_momentum_matches_gluon_for_every_policy():
    """Five steps of SGD with momentum and weight decay, different data per worker: each policy
    ends with parameters bit-identical to gluon's (the server adds two float32 values per
    element whatever the message boundaries, and each layer's update is gluon's own updater)."""
    cases = [["bytescheduler", BS], ["plain", {}], ["priority", {}], ["fifo", {}]]
    result = job("compare_with_gluon", "sgd", False, cases, 5)
    for rank_cases in (lines(result, "CASE")[:4], lines(result, "CASE")[4:]):
        by_policy = {c["policy"]: c for c in rank_cases}
        assert set(by_policy) == {"bytescheduler", "plain", "priority", "fifo"}
        for case in rank_cases:
            assert case["exact"], case
            assert case["moved"] > 1e-3  # training changed the parameters
            assert case["stats"]["steps_done"] == 5
        bs = by_policy["bytescheduler"]["plan"]
        assert bs["partition_bytes"] == 64 * 1024
        assert len(bs["partitioned_keys"]) == 1  # Dense(256)'s weight, in 16 pieces
        assert bs["merged"] == 2  # conv0 + conv1 bias; the last layer's weight and bias
        assert bs["messages"] == 22
        assert by_policy["bytescheduler"]["stats"]["issued"] == 5 * 22
        # one message per gradient, as gluon's Trainer ([Note: MXNet's pass-through])
        assert by_policy["plain"]["plan"]["messages"] == 10


@pytest.mark.timeout(120)
def test_adam_on_a_hybridized_model_matches_gluon():
    """A stateful optimizer (Adam's moments and per-index step counts) on a hybridized model,
    whose children's hooks never fire (the gates wait at the hybridized root)."""
    result = job("compare_with_gluon", "adam", True, [["bytescheduler", BS]], 5)
    cases = lines(result, "CASE")
    assert len(cases) == 2
    for case in cases:
        assert case["exact"] and case["hybrid"] and case["opt"] == "adam", case
        assert case["plan"]["merged"] == 2 and case["plan"]["partitioned_keys"]


@pytest.mark.timeout(200)
def test_online_tuning_switches_plans_and_still_matches_gluon():
    """tune=...: worker 0's tuner moves both workers between plans at the same steps (the
    starting setting, plain, a sampled one, then the best and plain again: keys of a plan are
    built once and reused), and the parameters stay bit-identical to gluon's, since the servers
    add the same two values per element whatever the messages."""
    tune = {"trials": 5, "steps_per_trial": 1, "warmup_steps": 1, "max_confirm_pairs": 0,
            "check_every": 0}
    result = job("compare_with_gluon", "sgd", False, [["bytescheduler", {**BS, "tune": tune}]],
                 14, timeout_s=170)
    cases = lines(result, "CASE")
    assert len(cases) == 2
    for case in cases:
        assert case["exact"], case
        assert case["stats"]["steps_done"] == 14
    assert cases[0]["stats"]["issued"] == cases[1]["stats"]["issued"]  # same plans, same steps
    tuner = next(c["stats"]["tuner"] for c in cases if c["stats"]["tuner"])
    assert tuner["phase"] == "tuned" and tuner["sampler"] == "tpe", tuner
    tried = [t[0] for t in tuner["trials"]]
    assert len(tried) == 5 and tried[1].startswith("policy=plain"), tried
    assert tried[0].startswith("policy=bytescheduler order=layer partition=65536 B"), tried
    assert len(set(tried)) >= 2
    # every chunk of each plan counted: fewer messages under plain, 22 under the start
    assert cases[0]["stats"]["issued"] != 14 * 22


@pytest.mark.timeout(200)
def test_default_settings_measure_the_fixed_sizes_against_plain():
    """No sizes, policy or tuner given: the first steps measure the fixed sizes against plain,
    alternately ([Note: measured defaults]), both workers keep the faster, and the parameters
    stay bit-identical to gluon's."""
    from legato.core.scheduler.policy import resolve_config

    result = job("compare_with_gluon", "sgd", False, [["bytescheduler", {}]], 84, timeout_s=170)
    cases = lines(result, "CASE")
    assert len(cases) == 2
    for case in cases:
        assert case["exact"] and case["stats"]["defaults"] == "fixed-or-plain", case
    tuner = next(c["stats"]["tuner"] for c in cases if c["stats"]["tuner"])
    tried = [t[0] for t in tuner["trials"]]
    fixed = resolve_config("bytescheduler").describe()
    plain = resolve_config("plain", merge_bytes=1).describe()  # one message per gradient
    assert tried[:4] == [fixed, plain, fixed, plain] and len(tried) in (4, 6, 8), tried
    assert tuner["phase"] == "tuned" and tuner["sampler"] == "none"
    assert cases[0]["stats"]["config"] == cases[1]["stats"]["config"] == tuner["chosen"]


@pytest.mark.timeout(150)
def test_gradient_accumulation_matches_gluon():
    """gluon's accumulation idiom (grad_req='add', two backward passes, step(2 * batch),
    zero_grad() right after step()): every policy ends bit-identical to gluon's Trainer. The
    zero_grad() runs while legato's messages are still to go: the staged copies keep it from
    clearing what is sent."""
    cases = [["bytescheduler", BS], ["plain", {}], ["fifo", {}]]
    result = job("compare_with_gluon", "sgd", False, cases, 4, 2, timeout_s=120)
    got = lines(result, "CASE")
    assert len(got) == 6
    for case in got:
        assert case["exact"], case
        assert case["moved"] > 1e-3 and case["stats"]["steps_done"] == 4


@pytest.mark.timeout(150)
def test_mixed_precision_with_loss_scaling_matches_gluon():
    """MXNet's AMP on CPU (bfloat16, amp.init_trainer, amp.scale_loss) with an overflow forced
    on each worker in turn: both workers skip those steps and the loss scale falls and grows as
    under gluon's Trainer; parameters bit-identical."""
    cases = [["bytescheduler", BS], ["plain", {}], ["fifo", {}]]
    result = job("compare_amp_with_gluon", cases, 6, timeout_s=120)
    got = lines(result, "AMP")
    assert len(got) == 6
    for case in got:
        assert case["scales"] == case["want_scales"], case
        # the scale each step used, then the next one's: it grows after two good steps and
        # falls after each overflow (MXNet's LossScaler applies a change one step late)
        assert case["want_scales"] == [2.0 ** 16] * 3 + [2.0 ** 17] + [2.0 ** 16] * 2 + [
            2.0 ** 15], case
        assert case["exact"], case
        assert case["steps_done"] == 6
        assert case["steps_skipped"] == 2    # the two overflows, on every worker


@pytest.mark.timeout(120)
def test_timeline_gathers_every_workers_messages_on_worker_0(tmp_path):
    trace_path = tmp_path / "trace.json"
    job("timeline", str(trace_path), 3)
    spans = [e for e in json.loads(trace_path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    for rank in (0, 1):
        comm = [e for e in spans if e["pid"] == rank and e["cat"] == "comm"]
        assert len(comm) == 3 * 22  # every message of the 3 steps (22 per step)
        lanes = {e["cat"] for e in spans if e["pid"] == rank}
        assert {"queue", "comm", "step"} <= lanes <= {"queue", "comm", "step", "wait"}, lanes
        steps = [e["name"] for e in spans if e["pid"] == rank and e["cat"] == "step"]
        assert steps == ["step 0", "step 1"]  # between the 3 calls of step()
        # MXNet's own profiler shows legato's messages and updates as tasks of its domain
        profile = json.loads((tmp_path / f"trace.json.profile-{rank}.json").read_text())
        ours = [e["name"] for e in profile["traceEvents"]
                if e.get("cat") == "legato" and e.get("ph") == "b"]
        assert sum(n.startswith("legato.msg ") for n in ours) == 3 * 22, ours
        assert sum(n.startswith("legato.update ") for n in ours) > 0, ours
    assert not list(tmp_path.glob(".trace.json.*")), "temporary file left behind"
    assert not list(tmp_path.glob("trace.json.rank*")), "spill file left behind"


@pytest.mark.timeout(120)
def test_a_timeline_on_one_worker_only_is_refused_on_both(tmp_path):
    result = job("timeline_on_one_worker", str(tmp_path / "trace.json"))
    workers = [p for p in result.procs if p.name.startswith("worker")]
    assert len(workers) == 2 and all("TIMELINE_REFUSED" in p.stdout for p in workers)


@pytest.mark.timeout(120)
def test_fp16_compression_sends_float16_and_stays_close_to_gluon():
    """compression="fp16": every message buffer is float16; after 5 steps the parameters are
    within float16 rounding of gluon's float32 Trainer but not equal to them, and the same
    under bytescheduler (partitions, merges) as under plain (the servers sum each element
    in float16 whatever the message boundaries)."""
    result = job("compressed", 5)
    got = lines(result, "COMPRESSED")
    assert len(got) == 4
    for case in got:
        assert case["wire"] == ["float16"], case
        assert 0 < case["worst"] < 1e-2 * case["scale"], case
    for rank_cases in (got[:2], got[2:]):
        assert {c["policy"] for c in rank_cases} == {"bytescheduler", "plain"}
        assert rank_cases[0]["digest"] == rank_cases[1]["digest"]


# -- priority order --------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_front_layers_are_started_first_when_all_are_ready():
    """Every gradient is ready before step() (mx.nd.waitall after backward); with one message in
    flight, the order is layer order after the first message (started alone, before the rest
    were posted), the same on both workers (worker 0 leads). FIFO sends them in backward order.
    Workers start from different initial weights; the trainer gives them worker 0's."""
    result = job("issue_order", "priority", {}, 3)
    orders = sorted(lines(result, "ORDER"), key=lambda o: o["rank"])
    assert orders[0]["chunks"] == orders[1]["chunks"]
    assert orders[0]["start"] == orders[1]["start"]
    n = orders[0]["per_step"]
    layers = orders[0]["layers"]
    assert len(layers) == 3 * n
    for step in range(3):
        mine = layers[step * n:(step + 1) * n]
        assert mine[1:] == sorted(mine[1:]), mine

    result = job("issue_order", "fifo", {}, 2)
    for order in lines(result, "ORDER"):
        n = order["per_step"]
        for step in range(2):
            mine = order["layers"][step * n:(step + 1) * n]
            assert mine == sorted(mine, reverse=True), mine


@pytest.mark.timeout(120)
def test_bytescheduler_sends_the_first_layer_before_the_partitions_of_a_big_one():
    """Credit of one partition: the first layer's message overtakes the 16 partitions of
    Dense(256), whose gradient was ready long before (backward produces it first)."""
    settings = dict(BS, credit_bytes=64 * 1024)
    result = job("issue_order", "bytescheduler", settings, 2)
    orders = sorted(lines(result, "ORDER"), key=lambda o: o["rank"])
    assert orders[0]["chunks"] == orders[1]["chunks"]
    n = orders[0]["per_step"]
    for step in range(2):
        mine = orders[0]["layers"][step * n:(step + 1) * n]
        first = mine.index(0)
        assert sum(1 for i, layer in enumerate(mine) if layer == 2 and i < first) <= 2, mine
        assert sum(1 for a, b in zip(mine, mine[1:]) if b < a) <= 2, mine


# -- dependency proxies ----------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_next_forward_starts_on_front_layers_while_the_last_layer_waits():
    """The last layer's gradients reach the scheduler 0.3 s late each step (as if its backward
    were slow), so its messages and update come last: the next forward of the first block goes
    ahead of that update, the last block's forward waits for it, and the result still equals
    gluon's."""
    result = job("front_layers_go_first", 0.3, 4)
    reports = lines(result, "PROXY")
    assert len(reports) == 2
    for report in reports:
        assert all(0.2 < a < 5 for a in report["ahead_s"]), report
        assert all(a > 0 for a in report["after_s"]), report


# -- mistakes ----------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_step_errors_with_a_live_kvstore():
    """One worker: a parameter with no gradient, step() twice after one backward,
    ignore_stale_grad, a closed trainer."""
    result = job("errors_in_step", workers=1)
    out = result.procs[-1].stdout
    assert "ERRORS OK" in out
    assert "[rank 0] step 0: 2 parameter(s) got no gradient" in out
    assert "[rank 0] step 1: 10 parameter(s) got no gradient" in out


def _net(initialize=True, in_units=3):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, in_units=in_units), gluon.nn.Dense(2, in_units=4))
    if initialize:
        net.initialize()
    return net


def _trainer(net, kvstore="dist_sync", **kw):
    # kvstore="dist_sync" as a name: gluon creates it lazily, so nothing connects here.
    return gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1}, kvstore=kvstore,
                         **kw)


@pytest.mark.parametrize("kvstore, fragment", [
    ("local", "kvstore='local' is not a parameter-server kvstore"),
    ("device", "kvstore='device' is not a parameter-server kvstore"),
    (None, "kvstore=None is not a parameter-server kvstore"),
    ("dist_async", "use kvstore='dist_sync'"),
])
def test_kvstore_must_be_dist_sync(kvstore, fragment):
    net = _net()
    with pytest.raises(ConfigError, match="run_mxnet_ps_job|dist_sync") as err:
        ScheduledTrainer(_trainer(net, kvstore, update_on_kvstore=False), net)
    assert fragment in str(err.value)


def test_a_local_kvstore_object_is_refused():
    net = _net()
    with pytest.raises(ConfigError, match="kvstore='local' is not a parameter-server"):
        ScheduledTrainer(_trainer(net, mx.kv.create("local"), update_on_kvstore=False), net)


def test_update_on_kvstore_true_is_refused():
    net = _net()
    with pytest.raises(ConfigError, match="update_on_kvstore=True.*update_on_kvstore=False"):
        ScheduledTrainer(_trainer(net, update_on_kvstore=True), net)


def test_uninitialized_parameters_are_refused():
    net = gluon.nn.Dense(3)  # deferred: the input size comes from the first forward
    net.initialize()
    with pytest.raises(ConfigError, match="is not initialized yet.*forward pass"):
        ScheduledTrainer(_trainer(net), net)


def test_trainer_and_model_must_hold_the_same_parameters():
    net, other = _net(), _net()
    with pytest.raises(ConfigError, match="does not hold 4 of the model's trainable"):
        ScheduledTrainer(_trainer(other), net)
    both = gluon.nn.HybridSequential()
    both.add(net)
    trainer = gluon.Trainer(list(net.collect_params().values())
                            + list(other.collect_params().values()), "sgd",
                            kvstore="dist_sync")
    with pytest.raises(ConfigError, match="holds 4 trainable parameter.*not the model's"):
        ScheduledTrainer(trainer, both)


def test_kvstore_compression_is_refused():
    net = _net()
    trainer = _trainer(net, compression_params={"type": "2bit", "threshold": 0.5})
    with pytest.raises(ConfigError, match="compression"):
        ScheduledTrainer(trainer, net)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"policy": "lifo"}, "policy='lifo' is unknown; known policies: fifo, priority"),
    ({"partition_bytes": 0}, "partition_bytes=0 is invalid"),
    ({"partition_bytes": 4096, "credit_bytes": 1024}, "pass credit_bytes >= partition_bytes"),
    ({"policy": "plain", "partition_bytes": 4096}, "policy='plain' sends DDP's buckets"),
    ({"timeout_s": 0}, "timeout_s=0 is invalid"),
    ({"policy": "priority", "tune": True}, "use policy='bytescheduler'"),
    ({"tune": {"trials": 2}}, "trials=2 is too few"),
    ({"tune": {"sampler": "gp"}}, "needs scipy"),
    ({"defaults": "simulated"}, "'simulated' is PyTorch's"),
    ({"defaults": "fixed-or-plain", "partition_bytes": 1 << 20},
     "but partition_bytes is given"),
])
def test_bad_arguments(kwargs, fragment):
    net = _net()
    with pytest.raises(ConfigError) as err:
        ScheduledTrainer(_trainer(net), net, **kwargs)
    assert fragment in str(err.value)


def test_wrong_types():
    net = _net()
    with pytest.raises(ConfigError, match="must be a gluon.Trainer"):
        ScheduledTrainer(object(), net)
    with pytest.raises(ConfigError, match="model must be a gluon Block"):
        ScheduledTrainer(_trainer(net), object())
