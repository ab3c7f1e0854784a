"""Sample-weighted FedAvg as a streaming sum: memory of one model however many clients report.

``new = old + sum_k(n_k * delta_k) / sum_k(n_k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedprune.coordinator.aggregation import Aggregator


class FedAvg(Aggregator):
    def __init__(self, shapes: Sequence[tuple[int, ...]], *, clip_norm: float = 0.0) -> None:
        super().__init__(shapes, clip_norm=clip_norm)
        self._sum = [np.zeros(shape, np.float64) for shape in self.shapes]
        self.total_samples = 0.0

    def _add(self, deltas: list[np.ndarray], num_samples: float) -> None:
        for acc, delta in zip(self._sum, deltas, strict=True):
            acc += num_samples * delta
        self.total_samples += num_samples

    def _delta(self) -> list[np.ndarray]:
        return [acc / self.total_samples for acc in self._sum]
