"""The framework-free half of training and judging a parity model: coding groups drawn from a
dataset, the regression target, and the accuracies a parity model is judged by.

- reconstruction accuracy: a rebuilt prediction's top class equals the base model's own top
  class for that query (how often degraded mode answers as the base model would have);
- degraded-mode accuracy: a rebuilt prediction's top class equals the true label;
- overall accuracy when a fraction f of answers is rebuilt: (1 - f) * A + f * A_degraded, with
  A the base model's accuracy.

Framework adapters (`legato.adapters.torch.parity`, ...) run the models; they hand numpy arrays
of outputs to `evaluate`.
"""

from __future__ import annotations

import numpy as np

from legato.core.errors import ConfigError
from legato.core.parity.codes import SubtractionDecoder

__all__ = ["evaluate", "overall_accuracy", "sample_groups"]


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
