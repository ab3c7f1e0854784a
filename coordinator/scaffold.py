"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct client drift.

Each device i keeps its control variate c_i (the average gradient of its local steps, in its
cache across rounds and restarts) and corrects every local gradient g to g - c_i + c, where c is
the coordinator's, sent with each round (``Round.control``). With its update a device sends c_i's
change Δc_i in the run's codec; the coordinator adds ``(1 / N) * sum(Δc_i)`` over the round's
devices to c, N being the devices of the fleet (Alg. 1, line 17).

A device's Δc_i is taken like its update: clipped to ``multiple`` times the median norm of the
previous round's (:class:`~fedprune.coordinator.aggregation.NormBound`), so a stolen device moves
c by at most that, divided by N. Pruned positions of c stay zero. A rebuilt (smaller) model
starts c again from zero, as each device starts its c_i again (its shapes no longer fit): c
stays their mean.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from fedprune.coordinator.aggregation import NormBound, l2_norm, median_norm
from fedprune.protocol.codec import Model, encode_model
from fedprune.protocol.errors import ConfigError

log = logging.getLogger("fedprune.coordinator")


class Control:
    """The global control variate c, and the round's Δc_i as they arrive."""

    def __init__(self, *, multiple: float = 3.0) -> None:
        self.c: list[np.ndarray] = []  # float64 per weight; empty until the first round
        self.bound = NormBound(multiple=multiple)
        self._sum: list[np.ndarray] = []
        self._norms: list[float] = []
        self._limit = 0.0

    def payload(self, model: Model) -> bytes:
        """c for a round of ``model`` (zeros at first), as a model payload with its masks."""
        if not self.c or [a.shape for a in self.c] != [w.shape for w in model.weights]:
            self.c = [np.zeros(w.shape, np.float64) for w in model.weights]
        self._sum = [np.zeros(w.shape, np.float64) for w in model.weights]
        self._norms = []
        self._limit = self.bound.of(self.c) if self.bound.median is not None else 0.0
        c = [
            (a if m is None else a * m).astype(np.float32)
            for a, m in zip(self.c, model.masks, strict=True)
        ]
        return encode_model(Model(weights=c, masks=model.masks, exact=model.exact))

    def add(self, change: Sequence[np.ndarray]) -> None:
        """One device's Δc_i (clipped to the bound of the round)."""
        norm = l2_norm(change)
        self._norms.append(norm)
        scale = self._limit / norm if self._limit and norm > self._limit else 1.0
        for acc, d in zip(self._sum, change, strict=True):
            acc += scale * np.asarray(d, np.float64)

    def close(self, model: Model, fleet: int) -> None:
        """The round is over: c += sum(Δc_i) / N, N the fleet's devices (at least those that
        sent one), at the kept positions of ``model``."""
        if self._norms:
            n = max(fleet, len(self._norms))
            self.c = [
                (c + s / n) * (1 if m is None else m)
                for c, s, m in zip(self.c, self._sum, model.masks, strict=True)
            ]
        self.bound.observe(median_norm(self._norms))

    def reset(self) -> None:
        """The model was rebuilt smaller: c starts again from zero, as every device's c_i does
        (its shapes no longer fit), so that c stays the mean of the c_i."""
        if self.c:
            log.info("SCAFFOLD's control variates start again: the model was rebuilt")
        self.c = []

    def state(self) -> dict[str, np.ndarray]:
        return {f"c{i:03d}": a for i, a in enumerate(self.c)}

    def load(self, state: Mapping[str, np.ndarray], shapes: Sequence[tuple[int, ...]]) -> None:
        c = [np.asarray(state[f"c{i:03d}"], np.float64) for i in range(len(state))]
        if c and [a.shape for a in c] != [tuple(s) for s in shapes]:
            raise ConfigError("SCAFFOLD's control variate does not fit the model's weights")
        self.c = c
