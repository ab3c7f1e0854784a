"""Sample-weighted FedAvg as a streaming sum: memory of one model however many clients report.

Updates are deltas at the unmasked positions (zeros elsewhere), so the average never touches a
pruned weight: ``new = old + sum_k(n_k * delta_k) / sum_k(n_k)``.
"""

from __future__ import annotations

import numpy as np

from fedprune.edge_client.codec import Update


class FedAvg:
    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        self._sum = [np.zeros(shape, np.float64) for shape in shapes]
        self.total_samples = 0
        self.count = 0
        self._metrics: dict[str, float] = {}
        self._metric_weight = 0.0

    def add(self, update: Update) -> None:
        for acc, delta in zip(self._sum, update.deltas, strict=True):
            acc += update.num_samples * delta.astype(np.float64)
        self.total_samples += update.num_samples
        self.count += 1
        n_eval = update.metrics.get("n_eval", 0.0)
        if n_eval > 0:
            for key in ("loss", "accuracy"):
                if key in update.metrics:
                    self._metrics[key] = self._metrics.get(key, 0.0) + n_eval * update.metrics[key]
            self._metric_weight += n_eval

    def apply(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        """The averaged model; ``weights`` unchanged when nothing was added."""
        if self.total_samples == 0:
            return weights
        return [
            (w.astype(np.float64) + acc / self.total_samples).astype(np.float32)
            for w, acc in zip(weights, self._sum, strict=True)
        ]

    def client_metrics(self) -> dict[str, float]:
        """Clients' held-out metrics, averaged weighted by their held-out sizes."""
        if self._metric_weight == 0:
            return {}
        return {k: v / self._metric_weight for k, v in self._metrics.items()}
