"""Model zoo for the rewrite benchmark: small TASO-benchmark-style networks exported to ONNX.

Every model is defined here with random weights (no downloads) and exported with
`torch.onnx.export(..., dynamo=False)`, the TorchScript exporter, at opset 17, float32:

  resnet18       basic blocks [2,2,2,2], half width (32..256), 112x112
  resnet50       bottleneck blocks [3,4,6,3], half width (128..1024 out), 112x112
  squeezenet     SqueezeNet-1.1 fire modules (squeeze 1x1, expand 1x1 + 3x3, Concat), 112x112
  inception      GoogLeNet-style modules: 1x1 | 1x1-3x3 | 1x1-5x5 | pool-1x1, Concat, 96x96
  resnext        ResNeXt bottlenecks, grouped 3x3 convs (32 groups x 4), [1,2,2,1], 96x96
  bert           4-layer encoder, hidden 256, 4 heads, seq 64, unfused attention (MatMul Q/K/V,
                 Softmax, MatMul), residual Add, LayerNorm decomposed into ReduceMean/Sub/Pow/
                 Sqrt/Div and tanh-approximated GELU with Pow(x, 3) (as HF's gelu_new), both of
                 which ORT fuses back; input is the embedded sequence (batch, 64, 256)
  nasnet         NasNet-A-style normal and reduction cells (separable convs, pools, identity
                 branches combined by Add, cell outputs Concat), 64x64
  nasrnn         NasRNN cell unrolled over 5 steps, hidden 512: per step 16 MatMuls on the shared
                 inputs x_t and h_{t-1}, Add/Tanh/Sigmoid/Relu/Mul; inputs x0..x4 and h0

Exporter [Note: exporter]: torch 2.13 defaults to the dynamo (torch.export + onnxscript) exporter.
Tried here, it works offline but takes 2.5-5.5 s per model instead of 0.1-0.9 s, emits opset 18
and its down-conversion to 17 fails on ReduceMean axes (the model silently stays at opset 18),
it cannot export NasRNN's varargs forward, and it runs onnxscript's optimizer first (so "the
exported model" would already be rewritten by another optimizer). The TorchScript exporter
(`dynamo=False`) is deprecated but still present: it emits opset 17 directly, plain ONNX ops,
deterministically. It folds eval-mode BatchNorm into the preceding Conv (constant folding), so
the CNNs have no BatchNormalization nodes, as in a normal deployment export.

Batch is an export parameter (static shapes, which onnxsim and shape-based rewrites need);
`dynamic_batch=True` instead names the batch dimension "batch".

Beware denormal floats in random weights: a float32 weight with 0 < |w| < 1.18e-38 (a denormal)
can make CPU kernels ~10x slower (onnxruntime#5472, #12959), and any weight near that range can
turn into a denormal after constant folding (BN folding multiplies weights). Random init can
produce such values (rarely, but a fixed seed must never depend on luck), so after
initialisation every parameter and buffer with |w| < 1e-30 is set to exactly 0
(`_flush_tiny`), and after export every float initializer and Constant tensor is scanned:
`export` raises if any nonzero |w| < 1e-30 remains (`tiny_initializers` lists them). Inputs from
`inputs_for` are flushed the same way.

API: `ZOO[name]() -> torch.nn.Module` (a `ZooModule`, seeded, eval mode),
`export(name, batch, path) -> Path` (written atomically), `inputs_for(model_path, batch, seed)`.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

OPSET = 17
SEED = 0
TINY = 1e-30  # weights with |w| below this are flushed to 0 (see the module docstring)


class ZooModule(nn.Module):
    """A zoo network: `input_shapes` gives each input's name and shape without the batch dim."""

    input_shapes: dict[str, tuple[int, ...]] = {}
    output_names: tuple[str, ...] = ("y",)

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {name: _flush_tensor(torch.randn((batch, *shape), generator=gen))
                for name, shape in self.input_shapes.items()}


# ---------------------------------------------------------------- initialisation


def _flush_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t[t.abs() < TINY] = 0.0
    return t


@torch.no_grad()
def _flush_tiny(model: nn.Module) -> None:
    for tensor in [*model.parameters(), *model.buffers()]:
        _flush_tensor(tensor.data)


@torch.no_grad()
def _init(model: nn.Module) -> None:
    """Deterministic random weights keeping activations O(1), BN stats included."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            m.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.0)
            m.bias.uniform_(-0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))
            if m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
        for name, p in m.named_parameters(recurse=False):
            if name.startswith("w_"):  # raw MatMul weights (bert, nasrnn): (in, out)
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[0]))
            elif name.startswith("b_") or name.startswith("ln_b"):
                p.uniform_(-0.1, 0.1)
            elif name.startswith("ln_g"):
                p.uniform_(0.8, 1.2)
    for m in model.modules():  # damp each residual branch so deep nets keep a sane scale
        if isinstance(m, (_Basic, _Bottleneck)):
            m.branch[-1].weight.data.mul_(0.3)


def _seeded(cls: type[ZooModule], **kwargs) -> Callable[[], ZooModule]:
    def build() -> ZooModule:
        torch.manual_seed(SEED)
        model = cls(**kwargs)
        _init(model)
        _flush_tiny(model)
        return model.eval()
    build.__name__ = f"build_{cls.__name__.lower()}"
    return build


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


# ---------------------------------------------------------------- ResNet / ResNeXt


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = _conv_bn(cin, cout, 3, stride)
        self.branch = _conv_bn(cout, cout, 3, relu=False)
        self.short = (_conv_bn(cin, cout, 1, stride, relu=False)
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.branch(self.body(x)) + self.short(x))


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, groups: int = 1):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, mid, 1), _conv_bn(mid, mid, 3, stride, groups))
        self.branch = _conv_bn(mid, cout, 1, relu=False)
        self.short = (_conv_bn(cin, cout, 1, stride, relu=False)
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.branch(self.body(x)) + self.short(x))


class ResNet(ZooModule):
    def __init__(self, depths=(2, 2, 2, 2), width: int = 32, bottleneck: bool = False,
                 groups: int = 1, group_width: int = 0, expansion: int = 4,
                 image: int = 112, classes: int = 100, stem_pool: bool = True):
        super().__init__()
        self.input_shapes = {"x": (3, image, image)}
        stem = [_conv_bn(3, width, 7, 2)]
        if stem_pool:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        blocks, cin = [], width
        for stage, depth in enumerate(depths):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                if bottleneck:
                    mid = groups * group_width * 2 ** stage if groups > 1 else width * 2 ** stage
                    cout = width * expansion * 2 ** stage
                    blocks.append(_Bottleneck(cin, mid, cout, stride, groups))
                else:
                    cout = width * 2 ** stage
                    blocks.append(_Basic(cin, cout, stride))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


# ---------------------------------------------------------------- SqueezeNet


class _Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, expand, 1)
        self.e3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)


class SqueezeNet(ZooModule):
    """SqueezeNet 1.1 layout."""

    def __init__(self, image: int = 112, classes: int = 100):
        super().__init__()
        self.input_shapes = {"x": (3, image, image)}
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool(),
            _Fire(64, 16, 64), _Fire(128, 16, 64), pool(),
            _Fire(128, 32, 128), _Fire(256, 32, 128), pool(),
            _Fire(256, 48, 192), _Fire(384, 48, 192), _Fire(384, 64, 256), _Fire(512, 64, 256))
        self.head = nn.Conv2d(512, classes, 1)

    def forward(self, x):
        x = torch.relu(self.head(self.features(x)))
        return torch.flatten(x.mean((2, 3)), 1)


# ---------------------------------------------------------------- Inception


class _Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.b1 = _conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(_conv_bn(cin, c3r, 1), _conv_bn(c3r, c3, 3))
        self.b5 = nn.Sequential(_conv_bn(cin, c5r, 1), _conv_bn(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class Inception(ZooModule):
    """GoogLeNet-style: stem, 3a 3b, pool, 4a 4b 4c, pool, 5a, at 3/4 of GoogLeNet's widths."""

    def __init__(self, image: int = 96, classes: int = 100):
        super().__init__()
        self.input_shapes = {"x": (3, image, image)}
        s = lambda c: max(8, c * 3 // 4)  # noqa: E731
        self.stem = nn.Sequential(_conv_bn(3, s(64), 7, 2), nn.MaxPool2d(3, 2, 1),
                                  _conv_bn(s(64), s(64), 1), _conv_bn(s(64), s(192), 3),
                                  nn.MaxPool2d(3, 2, 1))
        specs = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "pool",
                 (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64),
                 (128, 128, 256, 24, 64, 64), "pool", (256, 160, 320, 32, 128, 128)]
        layers, cin = [], s(192)
        for spec in specs:
            if spec == "pool":
                layers.append(nn.MaxPool2d(3, 2, 1))
                continue
            c1, c3r, c3, c5r, c5, cp = (s(c) for c in spec)
            layers.append(_Inception(cin, c1, c3r, c3, c5r, c5, cp))
            cin = c1 + c3 + c5 + cp
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


# ---------------------------------------------------------------- BERT (unfused attention)


def _layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm spelled out, as older exporters emit it (ORT fuses it back, from Basic)."""
    mean = x.mean(-1, keepdim=True)
    d = x - mean
    var = d.pow(2).mean(-1, keepdim=True)
    return d / torch.sqrt(var + eps) * gamma + beta


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


class _EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        for name, shape in [("q", (hidden, hidden)), ("k", (hidden, hidden)),
                            ("v", (hidden, hidden)), ("o", (hidden, hidden)),
                            ("f1", (hidden, ffn)), ("f2", (ffn, hidden))]:
            self.register_parameter(f"w_{name}", nn.Parameter(torch.empty(shape)))
            self.register_parameter(f"b_{name}", nn.Parameter(torch.empty(shape[1])))
        for i in (1, 2):
            self.register_parameter(f"ln_g{i}", nn.Parameter(torch.ones(hidden)))
            self.register_parameter(f"ln_b{i}", nn.Parameter(torch.zeros(hidden)))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, h = t.shape
        return t.reshape(b, s, self.heads, h // self.heads).transpose(1, 2)

    def forward(self, x):
        b, s, h = x.shape
        q = self._split(x @ self.w_q + self.b_q)
        k = self._split(x @ self.w_k + self.b_k)
        v = self._split(x @ self.w_v + self.b_v)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(h // self.heads)
        ctx = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, s, h)
        x = _layer_norm(x + ctx @ self.w_o + self.b_o, self.ln_g1, self.ln_b1)
        f = _gelu_tanh(x @ self.w_f1 + self.b_f1) @ self.w_f2 + self.b_f2
        return _layer_norm(x + f, self.ln_g2, self.ln_b2)


class Bert(ZooModule):
    def __init__(self, layers: int = 4, hidden: int = 256, heads: int = 4, ffn: int = 1024,
                 seq: int = 64):
        super().__init__()
        self.input_shapes = {"x": (seq, hidden)}
        self.layers = nn.ModuleList(_EncoderLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ---------------------------------------------------------------- NasNet-A


class _SepConv(nn.Module):
    """ReLU, depthwise kxk, pointwise 1x1, BN; twice, as in NasNet-A."""

    def __init__(self, c: int, k: int, stride: int = 1):
        super().__init__()
        self.ops = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
            nn.ReLU(), nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.ops(x)


class _NasCell(nn.Module):
    """NasNet-A normal cell (5 Add-combined pairs, Concat) or reduction cell (stride 2)."""

    def __init__(self, c_prev: int, c_cur: int, c: int, reduce: bool, prev_stride: int):
        super().__init__()
        self.reduce = reduce
        # align both inputs to c channels (and the older one to the current resolution)
        self.pre_prev = nn.Sequential(nn.ReLU(), nn.Conv2d(c_prev, c, 1, prev_stride, bias=False),
                                      nn.BatchNorm2d(c))
        self.pre_cur = nn.Sequential(nn.ReLU(), nn.Conv2d(c_cur, c, 1, bias=False),
                                     nn.BatchNorm2d(c))
        s = 2 if reduce else 1
        if reduce:
            self.ops = nn.ModuleList([
                _SepConv(c, 5, s), _SepConv(c, 7, s),      # b0 = sep5(h) + sep7(hp)
                nn.MaxPool2d(3, s, 1), _SepConv(c, 7, s),  # b1 = max(h) + sep7(hp)
                nn.AvgPool2d(3, s, 1, count_include_pad=False), _SepConv(c, 5, s),
                _SepConv(c, 3, 1), nn.MaxPool2d(3, s, 1),  # b3 = sep3(b0) + max(h)
                nn.AvgPool2d(3, 1, 1, count_include_pad=False)])  # b4 = avg(b0) + b1
        else:
            self.ops = nn.ModuleList([
                _SepConv(c, 3), _SepConv(c, 5),            # b0 = sep3(h) + sep5(hp)
                _SepConv(c, 5), _SepConv(c, 3),            # b1 = sep5(hp) + sep3(hp)
                nn.AvgPool2d(3, 1, 1, count_include_pad=False),  # b2 = avg(h) + hp
                nn.AvgPool2d(3, 1, 1, count_include_pad=False),  # b3 = avg(hp) + avg(hp)
                nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                _SepConv(c, 3)])                           # b4 = sep3(h) + h

    def forward(self, prev, cur):
        hp, h = self.pre_prev(prev), self.pre_cur(cur)
        o = self.ops
        if self.reduce:
            b0 = o[0](h) + o[1](hp)
            b1 = o[2](h) + o[3](hp)
            b2 = o[4](h) + o[5](hp)
            b3 = o[6](b0) + o[7](h)
            b4 = o[8](b0) + b1
            return torch.cat([b1, b2, b3, b4], 1)
        b0 = o[0](h) + o[1](hp)
        b1 = o[2](hp) + o[3](hp)
        b2 = o[4](h) + hp
        b3 = o[5](hp) + o[6](hp)
        b4 = o[7](h) + h
        return torch.cat([hp, b0, b1, b2, b3, b4], 1)


class NasNet(ZooModule):
    def __init__(self, c: int = 24, cells_per_stage: int = 2, stages: int = 3, image: int = 64,
                 classes: int = 100):
        super().__init__()
        self.input_shapes = {"x": (3, image, image)}
        self.stem = _conv_bn(3, 2 * c, 3, 2, relu=False)
        cells, c_prev, c_cur, cc, last_reduce = [], 2 * c, 2 * c, c, False
        for stage in range(stages):
            if stage > 0:
                cc *= 2
                cells.append(_NasCell(c_prev, c_cur, cc, True, 2 if last_reduce else 1))
                c_prev, c_cur, last_reduce = c_cur, 4 * cc, True
            for _ in range(cells_per_stage):
                cells.append(_NasCell(c_prev, c_cur, cc, False, 2 if last_reduce else 1))
                c_prev, c_cur, last_reduce = c_cur, 6 * cc, False
        self.cells = nn.ModuleList(cells)
        self.fc = nn.Linear(c_cur, classes)

    def forward(self, x):
        prev = cur = self.stem(x)
        for cell in self.cells:
            prev, cur = cur, cell(prev, cur)
        return self.fc(torch.flatten(torch.relu(cur).mean((2, 3)), 1))


# ---------------------------------------------------------------- NasRNN


class NasRNN(ZooModule):
    """TASO's NasRNN (examples/nasrnn.py): 8 x (x_t W + h W' + b) per step, then a fixed tree."""

    def __init__(self, hidden: int = 512, steps: int = 5):
        super().__init__()
        self.input_shapes = {f"x{t}": (hidden,) for t in range(steps)} | {"h0": (hidden,)}
        for i in range(8):
            self.register_parameter(f"w_x{i}", nn.Parameter(torch.empty(hidden, hidden)))
            self.register_parameter(f"w_h{i}", nn.Parameter(torch.empty(hidden, hidden)))
            self.register_parameter(f"b_{i}", nn.Parameter(torch.empty(hidden)))
        self.steps = steps

    def _cell(self, x, h):
        t = [x @ getattr(self, f"w_x{i}") + h @ getattr(self, f"w_h{i}") + getattr(self, f"b_{i}")
             for i in range(8)]
        m0 = torch.relu(t[0]) + torch.sigmoid(t[3])
        m1 = torch.sigmoid(t[1]) + torch.tanh(t[2])
        m2 = torch.sigmoid(t[4]) * torch.tanh(t[5])
        m3 = torch.sigmoid(t[6]) * torch.relu(t[7])
        m4 = torch.sigmoid(m1) + torch.tanh(m2)
        m5 = torch.tanh(m0) * torch.tanh(m3)
        return torch.tanh(torch.tanh(m4) * torch.tanh(m5))

    def forward(self, *inputs):  # x0 .. x{steps-1}, h0
        h = inputs[-1]
        for x in inputs[:-1]:
            h = self._cell(x, h)
        return h


# ---------------------------------------------------------------- registry and export


ZOO: dict[str, Callable[[], ZooModule]] = {
    "resnet18": _seeded(ResNet, depths=(2, 2, 2, 2), width=32),
    "resnet50": _seeded(ResNet, depths=(3, 4, 6, 3), width=32, bottleneck=True),
    "squeezenet": _seeded(SqueezeNet),
    "inception": _seeded(Inception),
    "resnext": _seeded(ResNet, depths=(1, 2, 2, 1), width=32, bottleneck=True, groups=32,
                       group_width=4, expansion=4, image=96),
    "bert": _seeded(Bert),
    "nasnet": _seeded(NasNet),
    "nasrnn": _seeded(NasRNN),
}


def build(name: str) -> ZooModule:
    """The seeded torch model `name`; unknown names raise listing the known ones."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]()


def tiny_initializers(model: onnx.ModelProto, tiny: float = TINY) -> dict[str, int]:
    """Float initializers and Constant tensors with nonzero values below `tiny`: name -> count."""
    tensors = [(t.name, t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [(node.output[0], a.t) for a in node.attribute if a.name == "value"]
    found = {}
    for name, t in tensors:
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                               onnx.TensorProto.FLOAT16):
            continue
        a = np.abs(numpy_helper.to_array(t))
        n = int(np.count_nonzero((a > 0) & (a < tiny)))
        if n:
            found[name] = n
    return found


def export(name: str, batch: int, path: str | os.PathLike, *,
           dynamic_batch: bool = False) -> Path:
    """Export zoo model `name` at `batch` to `path` (written atomically; parents created).

    Args:
        name: a key of ZOO.
        batch: the batch size of the example inputs (and of the graph unless dynamic_batch).
        path: the .onnx file to write.
        dynamic_batch: name the batch dimension "batch" instead of fixing it.
    Returns:
        The path written.
    """
    if batch < 1:
        raise ValueError(f"batch={batch} is invalid; pass batch >= 1")
    model = build(name)
    inputs = model.example_inputs(batch)
    names = list(inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            axes = ({n: {0: "batch"} for n in [*names, *model.output_names]}
                    if dynamic_batch else None)
            torch.onnx.export(model, tuple(inputs.values()), tmp, dynamo=False,
                              opset_version=OPSET, input_names=names,
                              output_names=list(model.output_names), dynamic_axes=axes)
        proto = onnx.load(tmp)
        tiny = tiny_initializers(proto)
        if tiny:
            raise RuntimeError(f"zoo model {name!r} exported with near-denormal weights "
                               f"(|w| < {TINY}) in {tiny}; flush them in _flush_tiny")
        proto.doc_string = f"legato rewrite zoo: {name}, batch {batch}, seed {SEED}"
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
             onnx.TensorProto.FLOAT16: np.float16}


def inputs_for(model_path: str | os.PathLike | onnx.ModelProto, batch: int,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Random standard-normal inputs for every graph input of the model (dim 0 = batch).

    Symbolic dims other than the first raise; tiny values are flushed to 0 like the weights.
    """
    model = (model_path if isinstance(model_path, onnx.ModelProto)
             else onnx.load(str(model_path), load_external_data=False))
    init = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    out = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        ttype = inp.type.tensor_type
        if ttype.elem_type not in _NP_TYPES:
            raise ValueError(f"input {inp.name!r} has element type "
                             f"{onnx.TensorProto.DataType.Name(ttype.elem_type)}; "
                             "inputs_for makes float inputs only")
        shape = []
        for i, d in enumerate(ttype.shape.dim):
            if i == 0:
                shape.append(batch)
            elif d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                raise ValueError(f"input {inp.name!r} dim {i} is symbolic ({d.dim_param!r}); "
                                 "only the batch dim (0) may be")
        a = rng.standard_normal(shape).astype(_NP_TYPES[ttype.elem_type])
        a[np.abs(a) < TINY] = 0
        out[inp.name] = a
    return out
