"""The framework-free half of training and judging a parity model: coding groups drawn from a
dataset, the regression target, and the accuracies a parity model is judged by.

- reconstruction accuracy: a rebuilt prediction's top class equals the base model's own top
  class for that query (how often degraded mode answers as the base model would have);
- degraded-mode accuracy: a rebuilt prediction's top class equals the true label;
- overall accuracy when a fraction f of answers is rebuilt: (1 - f) * A + f * A_degraded, with
  A the base model's accuracy.

Framework adapters (`legato.adapters.{torch,tensorflow,mxnet}.parity`) run the models; each
gives `train_pair` a `Trainer` (train, predict, export) and gets the same report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from legato.core.errors import ConfigError
from legato.core.parity.codes import SubtractionDecoder

__all__ = ["Trainer", "check_onnx", "evaluate", "overall_accuracy", "pair_trainer", "sample_groups",
           "train_pair"]

log = logging.getLogger(__name__)


def sample_groups(n_items: int, k: int, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """[n_groups, k] item indices, k distinct items per group, drawn uniformly."""
    if n_items < k:
        raise ConfigError(f"{n_items} items cannot form groups of k={k}")
    keys = rng.random((n_groups, n_items))
    return np.argpartition(keys, k - 1, axis=1)[:, :k] if n_items <= 4096 else np.stack(
        [rng.choice(n_items, size=k, replace=False) for _ in range(n_groups)])


def evaluate(outputs: np.ndarray, labels: np.ndarray, groups: np.ndarray,
             parity_outputs: np.ndarray) -> dict[str, float]:
    """Judge a parity model on coding groups.

    Args:
        outputs: the base model's outputs on every item [n, classes].
        labels: true labels [n].
        groups: [g, k] item indices of each group.
        parity_outputs: the parity model's output on each group's parity query [g, classes].
    Returns:
        base accuracy, reconstruction and degraded-mode accuracy (each group's every position
        rebuilt once from the others), and the number of reconstructions judged.
    """
    outputs, labels, groups = np.asarray(outputs), np.asarray(labels), np.asarray(groups)
    g, k = groups.shape
    if parity_outputs.shape != (g, outputs.shape[1]):
        raise ConfigError(f"parity outputs {parity_outputs.shape} do not match {g} groups of "
                          f"{outputs.shape[1]} outputs")
    decoder = SubtractionDecoder(k)
    member = outputs[groups]                                    # [g, k, classes]
    agree = correct = 0
    for i in range(k):
        rebuilt = decoder.decode_batch(member, parity_outputs, i).argmax(axis=1)
        agree += int((rebuilt == member[:, i].argmax(axis=1)).sum())
        correct += int((rebuilt == labels[groups[:, i]]).sum())
    n = g * k
    return {"base_accuracy": float((outputs.argmax(axis=1) == labels).mean()),
            "reconstruction_accuracy": agree / n, "degraded_accuracy": correct / n,
            "reconstructions": n}


def overall_accuracy(base_accuracy: float, degraded_accuracy: float, f: float) -> float:
    """Accuracy when a fraction f of answers is rebuilt: (1 - f) * A + f * A_degraded."""
    if not 0 <= f <= 1:
        raise ConfigError(f"f={f} is not a fraction")
    return (1 - f) * base_accuracy + f * degraded_accuracy


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a framework adapter gives `train_pair`: its own models, training and export, as
    the adapter's module-level functions.

    - train_base(ds, *, epochs, seed, hidden) -> model (hidden=(): a linear classifier);
    - outputs_of(model, x) -> numpy outputs;
    - train_parity(base_outputs, x_train, encoder, classes, *, steps, seed, time_limit_s)
      -> (model, info);
    - export_onnx(model, shape, path) -> path, checked in onnxruntime;
    - check_export() raises BackendUnavailable now if export cannot work (before training);
    - widths(model) -> layer widths, for the report's model name.
    """

    framework: str
    train_base: Callable[..., Any]
    outputs_of: Callable[[Any, np.ndarray], np.ndarray]
    train_parity: Callable[..., tuple[Any, dict]]
    export_onnx: Callable[[Any, Sequence[int], Path], Path]
    check_export: Callable[[], None]
    widths: Callable[[Any], list[int]]


def check_onnx(proto: Any, outputs_of: Callable[[np.ndarray], np.ndarray],
               shape: Sequence[int], framework: str) -> None:
    """Run an exported model (an onnx ModelProto, input "x") in onnxruntime on 5 random
    queries and compare with the framework's own outputs; raise before anything is written."""
    import onnxruntime as ort

    x = np.random.default_rng(0).random((5, *shape), dtype=np.float32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got, want = sess.run(None, {"x": x})[0], outputs_of(x)
    if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"the exported model differs from {framework} by "
                           f"{float(np.abs(got - want).max()):.3g}; not written")


def pair_trainer(trainer: Trainer) -> Callable[..., dict[str, Any]]:
    """The adapter's `train_parity_pair(dataset, k, encoder, out_dir, ...)`: `train_pair` with
    this framework."""
    def train_parity_pair(dataset: Any, k: int, encoder: str = "addition",
                          out_dir: str | Path | None = None, *, base_epochs: int = 30,
                          parity_steps: int = 20000, test_groups: int = 5000, seed: int = 0,
                          time_limit_s: float | None = None,
                          progress: Callable[[str, int, int], None] | None = None
                          ) -> dict[str, Any]:
        return train_pair(trainer, dataset, k, encoder, out_dir, base_epochs=base_epochs,
                          parity_steps=parity_steps, test_groups=test_groups, seed=seed,
                          time_limit_s=time_limit_s, progress=progress)

    train_parity_pair.__doc__ = (
        f"Train a base model, its parity model and a cheap backup model (a linear classifier) "
        f"in {trainer.framework} on `dataset` (a built-in's name or a Dataset), judge them, "
        f"and (with `out_dir`) write base.onnx, parity.onnx, backup.onnx and report.json "
        f"there; see legato.core.parity.training.train_pair.")
    return train_parity_pair


PAIR_KEY = "legato.pair_id"      # ONNX metadata: which training run a model came from


def pair_id(path: str | Path) -> str | None:
    """The training run an ONNX model file came from (`legato parity train` stamps the base,
    parity and backup models it writes together), or None (another source, or unreadable)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (whoever serves it reports a file it cannot load)
        return None
    return next((p.value for p in model.metadata_props if p.key == PAIR_KEY), None)


def _write_pair(trainer: Trainer, out: Path, shape, report: dict, models: dict) -> None:
    """Export the models and the report into a staging folder inside `out`, stamped with one
    pair id, then move them into place: a failure (a full disk) leaves the earlier files as
    they were, never a new base model beside an old parity model."""
    import os
    import shutil
    import tempfile
    import uuid

    import onnx

    from legato.core._files import atomic_json

    out.mkdir(parents=True, exist_ok=True)
    pair = uuid.uuid4().hex
    report["pair_id"] = pair
    stage = Path(tempfile.mkdtemp(prefix=".legato-parity-", dir=out))
    try:
        names = []
        for role, model in models.items():
            path = stage / f"{role}.onnx"
            trainer.export_onnx(model, shape, path)
            proto = onnx.load(str(path))
            entry = proto.metadata_props.add()
            entry.key, entry.value = PAIR_KEY, pair
            onnx.save(proto, str(path))
            names.append(path.name)
        atomic_json(stage / "report.json", report)
        for name in [*names, "report.json"]:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def train_pair(trainer: Trainer, dataset: Any, k: int, encoder: str = "addition",
               out_dir: str | Path | None = None, *, base_epochs: int = 30,
               parity_steps: int = 20000, test_groups: int = 5000, seed: int = 0,
               time_limit_s: float | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Train a base model, its parity model and a cheap backup model (a linear classifier)
    with `trainer`'s framework on `dataset` (a built-in's name, or a `datasets.Dataset`),
    judge them on `test_groups` coding groups of test images, and (with `out_dir`) write
    base.onnx, parity.onnx, backup.onnx and report.json there.

    The report: dataset, k, encoder, sizes, base accuracy, reconstruction and degraded-mode
    accuracy, overall accuracy at a few fractions of rebuilt answers, the backup model's and a
    default answer's accuracy, training times, the framework. `progress(phase, done, total)`
    is called as each of its phases starts (and with done == total at the end)."""
    from legato.core.parity import datasets
    from legato.core.parity.codes import ENCODERS, make_encoder

    if encoder not in ENCODERS:
        raise ConfigError(f"encoder {encoder!r} is unknown; known: {', '.join(ENCODERS)}")
    if out_dir is not None:
        trainer.check_export()                 # fail before training, not after
    phases = ["loading the data", f"training the base model ({base_epochs} epochs)",
              f"training the parity model ({parity_steps} steps)", "judging the pair",
              "training the backup model", "exporting to ONNX" if out_dir is not None else
              "done"]

    def phase(index: int) -> None:
        log.info("parity training: %s", phases[index] if index < len(phases) else "done")
        if progress is not None:
            progress(phases[min(index, len(phases) - 1)], index, len(phases))

    t0 = time.perf_counter()
    phase(0)
    ds = dataset if isinstance(dataset, datasets.Dataset) else datasets.load(dataset, seed=seed)
    enc = make_encoder(encoder, k, ds.shape)
    phase(1)
    base = trainer.train_base(ds, epochs=base_epochs, seed=seed, hidden=(200, 100))
    base_s = time.perf_counter() - t0
    cached = trainer.outputs_of(base, ds.x_train)
    phase(2)
    parity, info = trainer.train_parity(cached, ds.x_train, enc, ds.classes,
                                        steps=parity_steps, seed=seed,
                                        time_limit_s=time_limit_s)
    phase(3)
    groups = sample_groups(len(ds.x_test), k, test_groups, np.random.default_rng(seed + 1))
    test_out = trainer.outputs_of(base, ds.x_test)
    parity_out = trainer.outputs_of(parity,
                                    enc.encode_batch(ds.x_test[groups]).astype(np.float32))
    scores = evaluate(test_out, ds.y_test, groups, parity_out)
    phase(4)
    backup = trainer.train_base(ds, epochs=base_epochs, seed=seed, hidden=())
    backup_acc = float((trainer.outputs_of(backup, ds.x_test).argmax(axis=1)
                        == ds.y_test).mean())
    report = {
        "dataset": ds.name, "k": k, **enc.describe(), "query_shape": list(ds.shape),
        "train_images": len(ds.x_train), "test_images": len(ds.x_test),
        "test_groups": test_groups, **scores,
        "overall_accuracy": {str(f): overall_accuracy(scores["base_accuracy"],
                                                      scores["degraded_accuracy"], f)
                             for f in (0.01, 0.05, 0.1)},
        "backup_accuracy": backup_acc,
        "default_answer_accuracy": float(np.bincount(ds.y_test).max() / len(ds.y_test)),
        "base_training_s": base_s, "parity_training": info,
        "seconds": time.perf_counter() - t0, "seed": seed, "framework": trainer.framework,
        "model": "BaseMLP " + "-".join(str(w) for w in trainer.widths(base)),
    }
    phase(5)
    if out_dir is not None:
        _write_pair(trainer, Path(out_dir), ds.shape, report,
                    {"base": base, "parity": parity, "backup": backup})
    phase(len(phases))
    return json.loads(json.dumps(report))
