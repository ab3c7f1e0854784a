"""A global model in numpy for tests of the round loop: no TensorFlow, fixed masks.

It has the shapes of the ``mlp`` preset (64-64-64-10: 8,970 parameters) with half of each kernel
masked, as the TF-MOT pruner leaves it once its schedule is done, and answers what the loop asks
of a :class:`~fedprune.coordinator.global_model.GlobalModel`. A test helper, kept out of the
installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

import json

import numpy as np

from fedprune.protocol.codec import Model

SHAPES = [(64, 64), (64,), (64, 64), (64,), (64, 10), (10,)]


class MaskedModel:
    """An mlp-shaped model whose kernels are half masked; :meth:`step` prunes no further."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.masks: list[np.ndarray | None] = [
            _half(shape, rng) if len(shape) == 2 else None for shape in SHAPES
        ]
        self.weights = [
            (rng.standard_normal(shape) * 0.1).astype(np.float32) * (1 if m is None else m)
            for shape, m in zip(SHAPES, self.masks, strict=True)
        ]
        self.steps: list[int] = []
        self.cut = None  # it is never rebuilt

    def model(self) -> Model:
        return Model(
            weights=[w.copy() for w in self.weights],
            masks=[None if m is None else m.copy() for m in self.masks],
        )

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.weights = [np.asarray(w, np.float32) for w in weights]

    def step(self, round_: int) -> None:
        self.steps.append(round_)

    def rebuild_due(self, round_: int) -> bool:
        return False

    def rebuild(self) -> bool:
        return False

    def architecture(self) -> str:
        return json.dumps({"class_name": "Sequential", "shapes": SHAPES})

    def input_shape(self) -> list[int]:
        return [64]

    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for shape in SHAPES)

    def sparsity(self) -> float:
        masks = [m for m in self.masks if m is not None]
        return float(sum(m.size - np.count_nonzero(m) for m in masks) / sum(m.size for m in masks))


def _half(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A mask that keeps exactly half of its positions, drawn at random."""
    mask = np.zeros(int(np.prod(shape)), np.float32)
    mask[rng.permutation(mask.size)[: mask.size // 2]] = 1.0
    return mask.reshape(shape)
