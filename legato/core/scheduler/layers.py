"""Which layers' gradients are complete, as a plan's chunks finish (any adapter's updater).

A layer can be updated once every part of every one of its parameters has been reduced; with
partitioned and merged chunks that is a count per parameter (its chunks) and per layer (its
parameters). The counts reset themselves when they reach zero, ready for the next step.
"""

from __future__ import annotations

import threading
from typing import Sequence

from legato.core.scheduler.plan import Chunk, ChunkPlan

__all__ = ["LayerProgress", "layer_keys"]


def layer_keys(layer_of_key: Sequence[int], num_layers: int) -> list[list[int]]:
    """layer -> the keys (parameters) of that layer, in key order."""
    keys: list[list[int]] = [[] for _ in range(num_layers)]
    for key, layer in enumerate(layer_of_key):
        keys[layer].append(key)
    return keys


class LayerProgress:
    """Counts finished chunks per parameter and finished parameters per layer (thread-safe).

    Args:
        plan: the chunks of every step.
        layer_of_key: layer index of each key (parameter).
        num_layers: how many layers.
    """

    def __init__(self, plan: ChunkPlan, layer_of_key: Sequence[int], num_layers: int) -> None:
        self._plan = plan
        self._layer_of_key = list(layer_of_key)
        self.keys_of_layer = layer_keys(self._layer_of_key, num_layers)
        self._lock = threading.Lock()
        self._chunks_left = [len(plan.chunks_of(k)) for k in range(len(self._layer_of_key))]
        self._keys_left = [len(keys) for keys in self.keys_of_layer]

    def chunk_done(self, chunk: Chunk) -> tuple[list[int], list[int]]:
        """Record `chunk` as reduced; returns (keys now complete, layers now complete)."""
        keys, layers = [], []
        with self._lock:
            for key in chunk.keys:
                self._chunks_left[key] -= 1
                if self._chunks_left[key]:
                    continue
                self._chunks_left[key] = len(self._plan.chunks_of(key))
                keys.append(key)
                layer = self._layer_of_key[key]
                self._keys_left[layer] -= 1
                if not self._keys_left[layer]:
                    self._keys_left[layer] = len(self.keys_of_layer[layer])
                    layers.append(layer)
        return keys, layers
