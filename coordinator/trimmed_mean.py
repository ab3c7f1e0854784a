"""Coordinate-wise trimmed mean (Yin et al., 2018): per weight, drop the ``trim`` share of the
largest and of the smallest deltas, at least one of each when there are three or more, and
average the rest."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedprune.coordinator.aggregation import Stacked
from fedprune.protocol.errors import ConfigError


def trimmed(trim: float, devices: int) -> int:
    """How many of ``devices`` values a trimmed mean drops at each end: the ``trim`` share, at
    least one when there are three or more (ten devices with the default 0.1 would otherwise be
    the only fleet it protects), none below three (nothing would be left)."""
    if devices < 3 or trim <= 0:
        return 0
    return max(1, math.floor(trim * devices))


class TrimmedMean(Stacked):
    def __init__(
        self, shapes: Sequence[tuple[int, ...]], *, clip_norm: float = 0.0, trim: float = 0.1
    ) -> None:
        if not 0.0 <= trim < 0.5:
            raise ConfigError(f"trim must be in [0, 0.5), got {trim!r}")
        super().__init__(shapes, clip_norm=clip_norm)
        self.trim = trim

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        k = trimmed(self.trim, len(stacked))
        ordered = np.sort(stacked, axis=0)
        return np.asarray(ordered[k : len(stacked) - k].mean(axis=0))
