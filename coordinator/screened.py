"""FedAvg of the updates that do not make the held-out loss worse (loss-based rejection, as in
Fang et al. 2020, "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning").

The round's updates are kept (clipped, with their capped sample weights). When the round closes,
the coordinator's held-out loss is measured for the FedAvg of all of them and for each FedAvg
that leaves one out: an update whose absence lowers the loss (by more than 1%) is harming the
model. The worst is left out and the rest measured again, until no absence lowers the loss so or
a minority of the round's updates is out; the rest are averaged by their samples as FedAvg does.
An honest device with skewed data still counts unless it is among the worst of its round. It
costs one held-out evaluation per update, per update left out, per round, and every update of
the round in memory: a rule for the small signed fleets it defends, not for thousands.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedprune.coordinator.aggregation import Aggregator, Loss, plus
from fedprune.protocol.errors import ConfigError

MIN_HARM = 0.01
"""An update is left out only if its absence lowers the held-out loss by more than this share of
it: the spread of honest devices on skewed data is not harm (measured: benchmarks/poisoning.py,
docs/benchmarks.md)."""


class Screened(Aggregator):
    def __init__(
        self, shapes: Sequence[tuple[int, ...]], *, clip_norm: float = 0.0, loss: Loss | None
    ) -> None:
        super().__init__(shapes, clip_norm=clip_norm)
        if loss is None:
            raise ConfigError("the screened rule needs a held-out set to measure updates on")
        self.loss = loss
        self._updates: list[tuple[list[np.ndarray], float]] = []  # (deltas, samples)
        self._out: list[int] = []  # the updates left out, by the order they came in

    def _add(self, deltas: list[np.ndarray], num_samples: float) -> None:
        self._updates.append((deltas, num_samples))

    def delta(self, weights: list[np.ndarray]) -> list[np.ndarray] | None:
        if len(self._updates) >= 3:  # of two, which one lies?
            self._out = self._screen(weights)
            self.left_out = [self.sources[i] for i in self._out]
        return super().delta(weights)

    def _screen(self, weights: list[np.ndarray]) -> list[int]:
        """Leave out, one at a time, the update whose absence lowers the held-out loss most, and
        measure again (two devices that send the same lie each look harmless while the other
        stays), until none lowers it or a minority of the round is out."""
        kept, out = list(range(len(self._updates))), list[int]()
        base = self._loss(weights, kept)
        while len(out) < (len(self._updates) - 1) // 2:
            without = {i: self._loss(weights, [j for j in kept if j != i]) for i in kept}
            worst = min(kept, key=lambda i: without[i])
            if base - without[worst] <= MIN_HARM * base:
                break
            kept.remove(worst)
            out.append(worst)
            base = without[worst]  # the loss of what is kept now, measured already
        return sorted(out)

    def _loss(self, weights: list[np.ndarray], kept: Sequence[int]) -> float:
        return self.loss(plus(weights, self._mean(kept)))

    def _mean(self, kept: Sequence[int]) -> list[np.ndarray]:
        total = sum(self._updates[i][1] for i in kept) or 1.0
        mean = [np.zeros(shape, np.float64) for shape in self.shapes]
        for i in kept:
            deltas, samples = self._updates[i]
            for acc, delta in zip(mean, deltas, strict=True):
                acc += (samples / total) * delta
        return mean

    def _delta(self) -> list[np.ndarray]:
        return self._mean([i for i in range(len(self._updates)) if i not in self._out])
