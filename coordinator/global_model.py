"""What the round loop needs of the global model, so that the loop runs (and is tested) without
TensorFlow: :class:`~fedprune.coordinator.pruning.Pruner` is the implementation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from fedprune.edge_client.task import Evaluation
from fedprune.protocol.codec import Model

__all__ = ["Cutter", "Evaluator", "GlobalModel"]

Evaluator = Callable[[], Evaluation | None]
"""The global model's accuracy on the held-out set; ``None`` without one."""

Cutter = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
"""Cuts arrays laid out as the model's weights before a rebuild to the rebuilt (smaller) model's,
as its weights were cut: the server optimizer's state."""


class GlobalModel(Protocol):
    cut: Cutter | None  # after a rebuild that made the model smaller: how its weights were cut

    def model(self) -> Model: ...
    def set_weights(self, weights: list[np.ndarray]) -> None: ...
    def step(self, round_: int) -> None: ...
    def rebuild_due(self, round_: int) -> bool: ...
    def rebuild(self) -> bool: ...
    def architecture(self) -> str: ...
    def input_shape(self) -> list[int]: ...
    def parameters(self) -> int: ...
    def sparsity(self) -> float: ...
