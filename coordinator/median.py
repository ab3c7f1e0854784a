"""Coordinate-wise median of the round's updates (Yin et al., 2018): each weight moves by the
median of the devices' deltas, so fewer than half of them cannot drag it anywhere."""

from __future__ import annotations

import numpy as np

from fedprune.coordinator.aggregation import Stacked


class Median(Stacked):
    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        return np.asarray(np.median(stacked, axis=0))
