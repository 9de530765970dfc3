"""The torch pipeline profiler: layer DAGs (Sequential and FX), sizes, times, and a model left
as it was."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from legato.adapters.torch import profile_pipeline  # noqa: E402
from legato.core.errors import ConfigError  # noqa: E402
from legato.core.pipeline.profile import LayerProfile  # noqa: E402

FAST = {"warmup": 1, "repeats": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine a second thread's stalls (milliseconds)
    would swamp the layer times the timing test compares."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10))


class Block(nn.Module):
    """A ResNet basic block: the input skips two convolutions and is added back."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.conv2(y) + x)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def param_bytes(module: nn.Module) -> int:
    return sum(nbytes(p) for p in module.parameters() if p.requires_grad)


def test_sequential_is_a_chain_of_its_children_with_exact_sizes():
    model, x = cnn(), torch.randn(4, 3, 16, 16)
    prof = profile_pipeline(model, x, **FAST)
    assert [n.id for n in prof.nodes] == ["0", "1", "2", "3", "4", "5"]
    assert prof.edges == (("0", "1"), ("1", "2"), ("2", "3"), ("3", "4"), ("4", "5"))
    assert prof.is_chain
    assert prof.nodes[0].desc.startswith("Conv2d(3, 8")
    # activation bytes: each child's output, numel * itemsize, for the example batch
    h, expected = x, []
    with torch.no_grad():
        for child in model.eval():
            h = child(h)
            expected.append(nbytes(h))
    assert [n.activation_bytes for n in prof.nodes] == expected
    assert [n.activation_outputs for n in prof.nodes] == [(b,) for b in expected]
    assert [n.parameter_bytes for n in prof.nodes] == [param_bytes(c) for c in model]
    assert prof.parameter_bytes == param_bytes(model)
    assert all(n.optimizer_state_bytes == 0 for n in prof.nodes)
    assert prof.meta["model"] == "Sequential" and prof.meta["batch_size"] == 4
    assert prof.meta["framework"] == "torch" and prof.meta["device"] == "cpu"
    assert prof.meta["source"] == "legato torch profiler"
    assert prof.meta["inputs"] == [{"name": "input", "bytes": nbytes(x), "readers": ["0"]}]


def test_resnet_block_skip_connection_is_a_branch_in_the_dag():
    prof = profile_pipeline(ResNetish(), torch.randn(2, 3, 8, 8), **FAST)
    ids = [n.id for n in prof.nodes]
    # relu after bn1 is folded into bn1; the add (two producers) is its own node, named by the
    # module whose forward runs it (block), with the relu, pooling and flatten after it folded in
    assert ids == ["stem", "block.conv1", "block.bn1", "block.conv2", "block.add", "head"]
    assert set(prof.edges) == {("stem", "block.conv1"), ("block.conv1", "block.bn1"),
                               ("block.bn1", "block.conv2"), ("block.conv2", "block.add"),
                               ("stem", "block.add"), ("block.add", "head")}
    assert not prof.is_chain
    assert prof.predecessors()["block.add"] == ["block.conv2", "stem"]
    assert prof.node("block.bn1").desc.endswith("+ relu")
    assert prof.node("block.add").activation_bytes == 2 * 8 * 4  # pooled, flattened: (2, 8) fp32
    assert prof.node("stem").activation_bytes == 2 * 8 * 8 * 8 * 4
    assert prof.meta["graph"] == "fx" and prof.meta["loss_added_to"] == "head"


class TwoTower(nn.Module):
    """Two branches joined by cat; one Linear used twice (its parameters count once)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.left = nn.Linear(16, 16)
        self.right = nn.Linear(16, 8)
        self.shared = nn.Linear(24, 24)
        self.scale = nn.Parameter(torch.ones(24))

    def forward(self, x):
        h = self.embed(x).relu()
        joined = torch.cat([self.left(h), self.right(h)], dim=1)
        out = self.shared(self.shared(joined)) * self.scale
        return out.view(out.size(0), -1)


def test_fx_trace_gives_merge_nodes_shared_modules_and_direct_parameters():
    model = TwoTower()
    prof = profile_pipeline(model, torch.randn(5, 6), **FAST)
    assert [n.id for n in prof.nodes] == ["embed", "left", "right", "cat", "shared",
                                          "shared#2", "mul"]
    assert set(prof.edges) == {("embed", "left"), ("embed", "right"), ("left", "cat"),
                               ("right", "cat"), ("cat", "shared"), ("shared", "shared#2"),
                               ("shared#2", "mul")}
    by_id = {n.id: n for n in prof.nodes}
    assert by_id["shared"].parameter_bytes == param_bytes(model.shared)
    assert by_id["shared#2"].parameter_bytes == 0  # counted at its first call
    assert by_id["mul"].parameter_bytes == 24 * 4  # reads self.scale directly
    assert by_id["cat"].activation_bytes == 5 * 24 * 4
    assert by_id["mul"].activation_bytes == 5 * 24 * 4  # after the folded view
    assert prof.parameter_bytes == param_bytes(model)
    # the second call of `shared` computes its weight gradient too
    assert by_id["shared#2"].backward_weight_s > 0


def test_optimizer_state_bytes_are_measured():
    model = cnn()
    x = torch.randn(2, 3, 16, 16)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    prof = profile_pipeline(model, x, optimizer=adam, **FAST)
    assert [n.optimizer_state_bytes for n in prof.nodes] == [2 * param_bytes(c) for c in model]
    assert not adam.state  # the user's optimizer took no step
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert all(n.optimizer_state_bytes == 0
               for n in profile_pipeline(model, x, optimizer=sgd, **FAST).nodes)
    momentum = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    prof = profile_pipeline(model, x, optimizer=momentum, **FAST)
    assert [n.optimizer_state_bytes for n in prof.nodes] == [param_bytes(c) for c in model]


def test_times_are_positive_split_and_follow_the_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 16), nn.Linear(16, 1024), nn.Linear(1024, 1024),
                          nn.Linear(1024, 4))
    prof = profile_pipeline(model, torch.randn(256, 512), warmup=1, repeats=3)
    for n in prof.nodes:
        assert n.forward_s > 0 and n.backward_s > 0
        assert n.backward_input_s is not None and n.backward_weight_s > 0
    # the first layer reads the model input: no input gradient, as in training
    assert prof.nodes[0].backward_input_s == 0.0
    assert all(n.backward_input_s > 0 for n in prof.nodes[1:])
    tiny, big = prof.node("1"), prof.node("2")  # 16x1024 vs 1024x1024: 64x the FLOPs
    assert big.forward_s > 3 * tiny.forward_s
    assert big.backward_s > 3 * tiny.backward_s
    assert big.backward_weight_s > 3 * tiny.backward_weight_s
    unsplit = profile_pipeline(model, torch.randn(8, 512), split_backward=False, **FAST)
    assert all(n.backward_input_s is None and n.backward_weight_s is None
               for n in unsplit.nodes)


def test_model_and_optimizer_are_left_as_they_were():
    model = ResNetish()
    model.block.train(False)  # a mixed mode must come back as it was
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    model.head.weight.grad = torch.full_like(model.head.weight, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    opt_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    rng = torch.random.get_rng_state()
    profile_pipeline(model, x, optimizer=opt, **FAST)
    for k, v in model.state_dict().items():  # parameters and BN running stats, bit-equal
        assert torch.equal(v, state[k]), k
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["head.weight"]
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 0.5))
    for p, s in opt.state.items():
        assert all(torch.equal(v, opt_state[id(p)][k]) for k, v in s.items())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_profile_round_trips_and_takes_a_loss(tmp_path):
    labels = torch.tensor([1, 2, 3, 4])
    prof = profile_pipeline(cnn(), torch.randn(4, 3, 16, 16),
                            loss_fn=lambda out: F.cross_entropy(out, labels),
                            optimizer=torch.optim.Adam(cnn().parameters()), **FAST)
    assert prof.meta["loss"] == "<lambda>" and prof.meta["loss_forward_s"] > 0
    assert LayerProfile.load(prof.save(tmp_path / "cnn.json")) == prof


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Identity(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("model, x, words", [
    (Branchy(), torch.randn(2, 3), ["not an nn.Sequential", "FX-traceable", "wrap",
                                     "branches on a tensor's value"]),
    (nn.Sequential(), torch.randn(2, 3), ["empty nn.Sequential", "no layers"]),
    (Identity(), torch.randn(2, 3), ["has no layers"]),
    (cnn(), torch.randn(2, 5, 16, 16), ["example_inputs", "[2, 5, 16, 16]", "failed"]),
    (ResNetish(), torch.randn(2, 7, 8, 8), ["example_inputs", "[2, 7, 8, 8]", "failed"]),
    (cnn(), "not a tensor", ["holds no tensor", "['str']"]),
    (cnn(), (torch.randn(2, 3, 16, 16), torch.randn(2)), ["takes one input"]),
])
def test_bad_models_and_inputs_say_what_to_do(model, x, words):
    with pytest.raises(ConfigError) as info:
        profile_pipeline(model, x, **FAST)
    for w in words:
        assert w in str(info.value)


def test_bad_arguments_say_what_to_do():
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ConfigError, match="repeats=0"):
        profile_pipeline(cnn(), x, repeats=0)
    with pytest.raises(ConfigError, match="scalar tensor"):
        profile_pipeline(cnn(), x, loss_fn=lambda out: out * 2, **FAST)
    with pytest.raises(ConfigError, match="not a torch.optim.Optimizer"):
        profile_pipeline(cnn(), x, optimizer="adam", **FAST)
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        profile_pipeline(lambda t: t, x)


def test_calibration_scales_layers_to_whole_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    x = torch.randn(64, 256)
    prof = profile_pipeline(model, x, repeats=3, warmup=1)
    cal = prof.meta["calibration"]
    assert sum(n.forward_s for n in prof.nodes) == pytest.approx(cal["forward_measured_s"])
    assert sum(n.backward_s for n in prof.nodes) == pytest.approx(cal["backward_measured_s"])
    raw = profile_pipeline(model, x, repeats=3, warmup=1, calibrate=False)
    assert "calibration" not in raw.meta
    for p in model.parameters():                     # whole passes left no gradients behind
        assert p.grad is None


def test_update_time_is_measured_with_an_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2048), nn.Linear(2048, 2048))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    prof = profile_pipeline(model, torch.randn(4, 8), optimizer=opt, repeats=3, warmup=1)
    assert prof.node("1").update_s == 0.0                   # ReLU: no parameters
    assert prof.node("3").update_s > 3 * prof.node("0").update_s > 0
    assert all(n.update_s == 0.0 for n in profile_pipeline(model, torch.randn(4, 8),
                                                             repeats=3, warmup=1).nodes)
