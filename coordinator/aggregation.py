"""How the coordinator combines a round's updates: one small interface, one module per rule.

    Aggregator          the template: clip each update's norm (optional), keep the clients'
    │                   metrics, and ``apply`` = old weights + the rule's delta
    ├── FedAvg          sample-weighted mean, a streaming sum (fedavg.py)
    └── Stacked         keeps the round's updates, combines them per coordinate
        ├── Median      coordinate-wise median (median.py)
        └── TrimmedMean coordinate-wise mean without the extremes (trimmed_mean.py)

Updates are deltas at the kept positions (zeros where pruned), so no rule moves a pruned weight.
FedAvg weighs each update by the samples its device claims; the robust rules weigh every device
the same, so neither a large claim nor a few outliers per coordinate decide the result. They keep
every update of the round in memory (devices x model), FedAvg keeps one sum.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from enum import StrEnum

import numpy as np

from fedprune.protocol.codec import Update
from fedprune.protocol.errors import ConfigError


class Aggregator(ABC):
    def __init__(self, shapes: Sequence[tuple[int, ...]], *, clip_norm: float = 0.0) -> None:
        """``clip_norm`` > 0 scales any update whose L2 norm exceeds it down to that norm."""
        if not (clip_norm >= 0 and math.isfinite(clip_norm)):
            raise ConfigError(f"clip_norm must be >= 0 (0 = off), got {clip_norm!r}")
        self.shapes = [tuple(s) for s in shapes]
        self.clip_norm = clip_norm
        self.count = 0
        self.clipped = 0
        self._metrics: dict[str, float] = {}
        self._metric_weight = 0.0

    def add(self, update: Update, *, weight: float = 1.0) -> None:
        """Take one update; ``weight`` scales its samples (a stale update's), for the rules that
        weigh by samples."""
        deltas = [d.astype(np.float64) for d in update.deltas]
        if self.clip_norm:
            norm = math.sqrt(sum(float(np.sum(np.square(d))) for d in deltas))
            if norm > self.clip_norm:
                deltas = [d * (self.clip_norm / norm) for d in deltas]
                self.clipped += 1
        self._add(deltas, update.num_samples * weight)
        self.count += 1
        n_eval = update.metrics.get("n_eval", 0.0)
        if n_eval > 0:
            for key in ("loss", "accuracy"):
                if key in update.metrics:
                    self._metrics[key] = self._metrics.get(key, 0.0) + n_eval * update.metrics[key]
            self._metric_weight += n_eval

    def apply(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        """The new model; ``weights`` unchanged when nothing was added."""
        if self.count == 0:
            return weights
        return [
            (w.astype(np.float64) + d).astype(np.float32)
            for w, d in zip(weights, self._delta(), strict=True)
        ]

    @property
    def evaluated(self) -> float:
        """The clients' held-out samples behind :meth:`client_metrics`."""
        return self._metric_weight

    def client_metrics(self) -> dict[str, float]:
        """Clients' held-out metrics, averaged weighted by their held-out sizes."""
        if self._metric_weight == 0:
            return {}
        return {k: v / self._metric_weight for k, v in self._metrics.items()}

    @abstractmethod
    def _add(self, deltas: list[np.ndarray], num_samples: float) -> None:
        """Take one (clipped, float64) update."""

    @abstractmethod
    def _delta(self) -> list[np.ndarray]:
        """The combined delta of everything added (at least one update)."""


class Stacked(Aggregator):
    """Base of the coordinate-wise rules: keeps every update, combines them along axis 0."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], *, clip_norm: float = 0.0) -> None:
        super().__init__(shapes, clip_norm=clip_norm)
        self._updates: list[list[np.ndarray]] = []

    def _add(self, deltas: list[np.ndarray], num_samples: float) -> None:
        self._updates.append(deltas)

    def _delta(self) -> list[np.ndarray]:
        return [self._combine(np.stack(layer)) for layer in zip(*self._updates, strict=True)]

    @abstractmethod
    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        """One tensor's combined delta from its updates stacked on axis 0."""


class Rule(StrEnum):
    """How a round's updates are combined: one module each."""

    FEDAVG = "fedavg"  # fedavg.py: the sample-weighted mean, a streaming sum
    MEDIAN = "median"  # median.py: the coordinate-wise median
    TRIMMED_MEAN = "trimmed-mean"  # trimmed_mean.py: the mean without the extremes


def tolerated(rule: Rule | str, devices: int, trim: float) -> int:
    """How many of a round's ``devices`` may send anything at all (Byzantine) without moving
    ``rule``'s result beyond the honest devices' range, per weight: none for FedAvg (one update
    can move the mean anywhere; clipping and the weight cap only bound how far)."""
    from fedprune.coordinator.trimmed_mean import trimmed  # the rules import this module

    rule = Rule(rule)
    if rule is Rule.MEDIAN:
        return max(0, (devices - 1) // 2)
    if rule is Rule.TRIMMED_MEAN:
        return trimmed(trim, devices)
    return 0


def make_aggregator(
    rule: Rule | str,
    shapes: Sequence[tuple[int, ...]],
    *,
    clip_norm: float = 0.0,
    trim: float = 0.1,
) -> Aggregator:
    """The aggregator of ``rule``."""
    from fedprune.coordinator.fedavg import FedAvg  # the rules import this module
    from fedprune.coordinator.median import Median
    from fedprune.coordinator.trimmed_mean import TrimmedMean

    makers: dict[Rule, Callable[[], Aggregator]] = {
        Rule.FEDAVG: lambda: FedAvg(shapes, clip_norm=clip_norm),
        Rule.MEDIAN: lambda: Median(shapes, clip_norm=clip_norm),
        Rule.TRIMMED_MEAN: lambda: TrimmedMean(shapes, clip_norm=clip_norm, trim=trim),
    }
    try:
        return makers[Rule(rule)]()
    except ValueError:
        rules = ", ".join(r.value for r in Rule)
        raise ConfigError(f"unknown aggregation {rule!r} (one of {rules})") from None
