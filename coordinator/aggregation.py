"""How the coordinator combines a round's updates: one small interface, one module per rule.

    Aggregator          the template: clip each update's norm (to the round's NormBound), keep
    │                   the clients' metrics, and ``apply`` = old weights + the rule's delta
    ├── FedAvg          sample-weighted mean, a streaming sum (fedavg.py)
    ├── Screened        FedAvg of the updates that do not make the held-out loss worse
    │                   (screened.py)
    └── Stacked         keeps the round's updates, combines them per coordinate
        ├── Median      coordinate-wise median (median.py)
        └── TrimmedMean coordinate-wise mean without the extremes (trimmed_mean.py)

Updates are deltas at the kept positions (zeros where pruned), so no rule moves a pruned weight.
FedAvg weighs each update by the samples its device claims; the robust rules weigh every device
the same, so neither a large claim nor a few outliers per coordinate decide the result. They keep
every update of the round in memory (devices x model), FedAvg keeps one sum.

Every rule clips to the round's bound (:class:`NormBound`): by default a few times the median norm
of the previous round's updates, so no update moves the model much further than an honest one.
"""

from __future__ import annotations

import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np

from fedprune.protocol.codec import Update
from fedprune.protocol.errors import ConfigError

if TYPE_CHECKING:
    from fedprune.coordinator.scaffold import Control

Loss = Callable[[list[np.ndarray]], float]
"""The held-out loss of a model with these weights (the screened rule's measure)."""


class Aggregator(ABC):
    def __init__(self, shapes: Sequence[tuple[int, ...]], *, clip_norm: float = 0.0) -> None:
        """``clip_norm`` > 0 scales any update whose L2 norm exceeds it down to that norm."""
        if not (clip_norm >= 0 and math.isfinite(clip_norm)):
            raise ConfigError(f"clip_norm must be >= 0 (0 = off), got {clip_norm!r}")
        self.shapes = [tuple(s) for s in shapes]
        self.clip_norm = clip_norm
        self.count = 0
        self.norms: list[float] = []  # each update's L2 norm as it came, before clipping
        self.sources: list[str] = []  # each update's device, as given to ``add``
        self.left_out: list[str] = []  # devices whose update the rule left out (screened)
        self._metrics: dict[str, float] = {}
        self._metric_weight = 0.0
        self.control: Control | None = None  # SCAFFOLD: takes each update's control change

    def add(self, update: Update, *, weight: float = 1.0, source: str = "") -> None:
        """Take one update of device ``source``; ``weight`` scales its samples (a stale or a
        capped update's), for the rules that weigh by samples."""
        deltas = [d.astype(np.float64) for d in update.deltas]
        norm = l2_norm(deltas)
        self.norms.append(norm)
        self.sources.append(source)
        if self.clip_norm and norm > self.clip_norm:
            deltas = [d * (self.clip_norm / norm) for d in deltas]
        self._take(deltas, update, weight)
        if self.control is not None and update.control is not None:
            self.control.add(update.control)

    def merge(self, partial: Update, *, weight: float, norms: Sequence[float]) -> None:
        """Take the partial sum of an aggregator process (FedAvg): its average delta, already
        clipped there, ``weight`` the samples behind it, ``norms`` those of its updates."""
        self.norms.extend(norms)
        self._take([d.astype(np.float64) for d in partial.deltas], partial, weight)

    def clipped(self) -> int:
        """How many of the updates were clipped."""
        return sum(n > self.clip_norm for n in self.norms) if self.clip_norm else 0

    def _take(self, deltas: list[np.ndarray], update: Update, weight: float) -> None:
        self._add(deltas, update.num_samples * weight)
        self.count += 1
        n_eval = update.metrics.get("n_eval", 0.0)
        if n_eval > 0:
            for key in ("loss", "accuracy"):
                if key in update.metrics:
                    self._metrics[key] = self._metrics.get(key, 0.0) + n_eval * update.metrics[key]
            self._metric_weight += n_eval

    def delta(self, weights: list[np.ndarray]) -> list[np.ndarray] | None:
        """The combined delta of the round that trained ``weights`` (float64); ``None`` when
        nothing was added. The server optimizer (server_optimizer.py) takes it from here."""
        return self._delta() if self.count else None

    def apply(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        """The new model as FedAvg writes it, ``weights + delta``; ``weights`` unchanged when
        nothing was added."""
        delta = self.delta(weights)
        return weights if delta is None else plus(weights, delta)

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


def plus(weights: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``weights + delta`` in float64, as float32 weights."""
    return [
        (w.astype(np.float64) + d).astype(np.float32) for w, d in zip(weights, delta, strict=True)
    ]


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of ``arrays`` taken as one vector."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


@dataclass(kw_only=True)
class NormBound:
    """The L2 norm a round's updates are clipped to: ``fixed`` (> 0), or adaptive, ``multiple``
    times the median norm of the updates the latest round took (as they came: the median moves
    only if half the devices lie). Before any round took one, an update may not be larger than
    the model it trains. 0 for both: no bound."""

    fixed: float = 0.0
    multiple: float = 0.0
    median: float | None = None  # of the latest round that took updates (and their norms)

    def of(self, weights: Sequence[np.ndarray]) -> float:
        """The bound of a round that trains ``weights`` (0: none)."""
        if self.fixed > 0:
            return self.fixed
        if self.multiple <= 0:
            return 0.0
        return l2_norm(weights) if self.median is None else self.multiple * self.median

    def observe(self, median: float | None) -> None:
        """A round is over; ``median`` is the median norm of its updates (None: it had none)."""
        if median is not None and median > 0 and math.isfinite(median):
            self.median = median


def median_norm(norms: Sequence[float]) -> float | None:
    return statistics.median(norms) if norms else None


class Rule(StrEnum):
    """How a round's updates are combined: one module each."""

    FEDAVG = "fedavg"  # fedavg.py: the sample-weighted mean, a streaming sum
    MEDIAN = "median"  # median.py: the coordinate-wise median
    TRIMMED_MEAN = "trimmed-mean"  # trimmed_mean.py: the mean without the extremes
    SCREENED = "screened"  # screened.py: fedavg of the updates the held-out loss accepts
    AUTO = "auto"  # RunConfig picks one: screened or median for a signed fleet, else fedavg


def tolerated(rule: Rule | str, devices: int, trim: float) -> int:
    """How many of a round's ``devices`` may send anything at all (Byzantine) without moving
    ``rule``'s result beyond the honest devices' range, per weight: none for FedAvg (one update
    can move the mean anywhere; clipping and the weight cap only bound how far)."""
    from fedprune.coordinator.trimmed_mean import trimmed  # the rules import this module

    rule = Rule(rule)
    if rule in (Rule.MEDIAN, Rule.SCREENED):
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
    loss: Loss | None = None,
) -> Aggregator:
    """The aggregator of ``rule``; ``loss`` measures a model on the held-out set (screened)."""
    from fedprune.coordinator.fedavg import FedAvg  # the rules import this module
    from fedprune.coordinator.median import Median
    from fedprune.coordinator.screened import Screened
    from fedprune.coordinator.trimmed_mean import TrimmedMean

    makers: dict[Rule, Callable[[], Aggregator]] = {
        Rule.FEDAVG: lambda: FedAvg(shapes, clip_norm=clip_norm),
        Rule.MEDIAN: lambda: Median(shapes, clip_norm=clip_norm),
        Rule.TRIMMED_MEAN: lambda: TrimmedMean(shapes, clip_norm=clip_norm, trim=trim),
        Rule.SCREENED: lambda: Screened(shapes, clip_norm=clip_norm, loss=loss),
    }
    try:
        return makers[Rule(rule)]()
    except (ValueError, KeyError):
        rules = ", ".join(r.value for r in Rule if r is not Rule.AUTO)
        raise ConfigError(f"unknown aggregation {rule!r} (one of {rules})") from None
