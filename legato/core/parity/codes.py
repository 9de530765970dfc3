"""Erasure codes over queries and predictions (Parity Models, Kosaian et al., SOSP'19).

k queries from different users form a coding group. An `Encoder` turns them into one parity
query; a parity model P, trained so that P(encode(X_1..X_k)) ~ F(X_1) + ... + F(X_k) for the
deployed model F, serves it. When one of the k original predictions is missing (a slow or dead
replica), a `Decoder` rebuilds it from the k - 1 that arrived and the parity output:

    F(X_i) ~ P(encode(X)) - sum_{j != i} F(X_j)                       (`SubtractionDecoder`)

Encoders here (numpy, one group or a batch of groups; shapes are those of one query):
- `AdditionEncoder(k)`: the sum of the k queries, any k. With a linear F (no bias) and P = F the
  reconstruction is exact (tested).
- `ConcatenationEncoder(k, shape)`: images shrunk onto a grid of k tiles in one image of the
  original size (k=2 side by side, k=4 in quadrants, other k on the squarest grid that fits);
  shrinking averages blocks of pixels when the size divides, else samples the nearest pixel.

Shapes: a group is an array [k, *query_shape]; a batch of groups is [n, k, *query_shape]; the
parity query has `query_shape`. Predictions are arrays [*output_shape] (logits, scores).
"""

from __future__ import annotations

import abc
import math
from typing import Mapping, Sequence

import numpy as np

from legato.core.errors import ConfigError

__all__ = ["AdditionEncoder", "ConcatenationEncoder", "Decoder", "Encoder", "SubtractionDecoder",
           "make_encoder", "parity_target"]


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
        raise ConfigError(f"k={k!r} is invalid; a coding group holds k >= 2 queries")
    return int(k)


class Encoder(abc.ABC):
    """k queries -> one parity query of the same shape."""

    name = ""

    def __init__(self, k: int) -> None:
        self.k = _check_k(k)

    def encode(self, group: np.ndarray) -> np.ndarray:
        """One group [k, *shape] -> the parity query [*shape]."""
        group = np.asarray(group)
        if group.ndim < 1 or group.shape[0] != self.k:
            raise ConfigError(f"{type(self).__name__}(k={self.k}) encodes groups of {self.k} "
                              f"queries; got an array of shape {group.shape}")
        return self.encode_batch(group[None])[0]

    def encode_batch(self, groups: np.ndarray) -> np.ndarray:
        """Groups [n, k, *shape] -> parity queries [n, *shape]."""
        groups = np.asarray(groups)
        if groups.ndim < 2 or groups.shape[1] != self.k:
            raise ConfigError(f"{type(self).__name__}(k={self.k}) takes groups shaped [n, "
                              f"{self.k}, ...]; got {groups.shape}")
        return self._encode(groups)

    @abc.abstractmethod
    def _encode(self, groups: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict:
        return {"encoder": self.name, "k": self.k}


class AdditionEncoder(Encoder):
    """The parity query is the sum of the k queries."""

    name = "addition"

    def _encode(self, groups: np.ndarray) -> np.ndarray:
        return groups.sum(axis=1)


def _grid(k: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == k, as square as possible, preferring grids that divide
    the image (k=2: 1x2 side by side; k=4: 2x2)."""
    options = [(r, k // r) for r in range(1, k + 1) if k % r == 0]
    options = [(r, c) for r, c in options if r <= height and c <= width]
    if not options:
        raise ConfigError(f"k={k} tiles do not fit in a {height}x{width} image; use a smaller "
                          "k or the addition encoder")
    return min(options, key=lambda rc: (height % rc[0] != 0 or width % rc[1] != 0,
                                        abs(math.log(rc[0] / rc[1])), rc[0]))


def _shrink(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[..., H, W] -> [..., H//rows..., W//cols...]: block means where the sizes divide, else
    the nearest pixel of each tile cell."""
    h, w = images.shape[-2:]
    th, tw = h // rows, w // cols
    if h % rows == 0 and w % cols == 0:
        blocks = images.reshape(*images.shape[:-2], th, rows, tw, cols)
        return blocks.mean(axis=(-3, -1))
    ys = np.minimum(((np.arange(th) + 0.5) * h / th).astype(int), h - 1)
    xs = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(int), w - 1)
    return images[..., ys[:, None], xs[None, :]]


class ConcatenationEncoder(Encoder):
    """Each of the k images is shrunk to one tile of a grid; the tiles make one image of the
    original size (borders left by sizes that do not divide are zero)."""

    name = "concat"

    def __init__(self, k: int, shape: Sequence[int]) -> None:
        super().__init__(k)
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ConfigError(f"the concatenation encoder takes images [..., H, W]; got query "
                              f"shape {shape}")
        self.shape = shape
        self.rows, self.cols = _grid(self.k, *shape[-2:])

    def _encode(self, groups: np.ndarray) -> np.ndarray:
        if tuple(groups.shape[2:]) != self.shape:
            raise ConfigError(f"queries of shape {tuple(groups.shape[2:])} do not match the "
                              f"encoder's {self.shape}")
        h, w = self.shape[-2:]
        th, tw = h // self.rows, w // self.cols
        tiles = _shrink(groups.astype(np.float32, copy=False), self.rows, self.cols)
        out = np.zeros((groups.shape[0], *self.shape), dtype=tiles.dtype)
        for i in range(self.k):
            r, c = divmod(i, self.cols)
            out[..., r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[:, i]
        return out

    def describe(self) -> dict:
        return {**super().describe(), "grid": [self.rows, self.cols]}


class Decoder(abc.ABC):
    """Rebuild a missing prediction from the others of its group and the parity output."""

    def __init__(self, k: int) -> None:
        self.k = _check_k(k)

    @abc.abstractmethod
    def decode(self, available: Mapping[int, np.ndarray], parity_output: np.ndarray,
               missing: int) -> np.ndarray:
        """`available`: position in the group -> prediction, for every position but `missing`."""

    def _check(self, available: Mapping[int, np.ndarray], missing: int) -> None:
        if not 0 <= missing < self.k:
            raise ConfigError(f"missing={missing} is not a position of a group of {self.k}")
        want = set(range(self.k)) - {missing}
        if set(available) != want:
            raise ConfigError(f"decoding position {missing} needs the predictions of positions "
                              f"{sorted(want)}; got {sorted(available)}")


class SubtractionDecoder(Decoder):
    """missing = parity output - sum of the available predictions (pairs with a parity model
    trained toward the sum of the k predictions)."""

    def decode(self, available: Mapping[int, np.ndarray], parity_output: np.ndarray,
               missing: int) -> np.ndarray:
        self._check(available, missing)
        out = np.array(parity_output, dtype=np.float64, copy=True)
        for pred in available.values():
            out -= np.asarray(pred, dtype=np.float64)
        return out.astype(np.asarray(parity_output).dtype, copy=False)

    def decode_batch(self, outputs: np.ndarray, parity_outputs: np.ndarray,
                     missing: np.ndarray | int) -> np.ndarray:
        """For groups [n, k, *out] of predictions (the missing ones' values are ignored) and
        parity outputs [n, *out]: the rebuilt prediction of position `missing` of each group."""
        outputs = np.asarray(outputs)
        n = outputs.shape[0]
        missing = np.broadcast_to(np.asarray(missing), (n,))
        mask = np.ones(outputs.shape[:2], dtype=bool)
        mask[np.arange(n), missing] = False
        mask = mask.reshape(mask.shape + (1,) * (outputs.ndim - 2))
        return np.asarray(parity_outputs) - (outputs * mask).sum(axis=1)


def parity_target(outputs: np.ndarray) -> np.ndarray:
    """What a parity model learns for groups of predictions [n, k, *out]: their sum."""
    return np.asarray(outputs).sum(axis=1)


ENCODERS = ("addition", "concat")


def make_encoder(name: str, k: int, shape: Sequence[int]) -> Encoder:
    """One of `ENCODERS` for queries of `shape`."""
    if name == "addition":
        return AdditionEncoder(k)
    if name == "concat":
        return ConcatenationEncoder(k, shape)
    raise ConfigError(f"encoder {name!r} is unknown; known: {', '.join(ENCODERS)}")
