"""The server optimizer: the round's combined update is a pseudo-gradient, and an optimizer on
the coordinator takes the step (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2).

With Δ the aggregate (the rule's combined delta, aggregation.py), per weight:

    sgd       x += lr * Δ                                   (lr 1: FedAvg, the default)
    momentum  m = momentum * m + Δ;  x += lr * m            (FedAvgM, Hsu et al. 2019)
    adagrad   v = v + Δ²                                    ┐
    yogi      v = v - (1 - b2) * Δ² * sign(v - Δ²)          ├ m = b1 * m + (1 - b1) * Δ
    adam      v = b2 * v + (1 - b2) * Δ²                    ┘ x += lr * m / (sqrt(v) + tau)

with m = 0 and v = tau² at the start, as in the paper (no bias correction). Pruned weights stay
zero: the step is masked by the model's TF-MOT masks and so is the momentum they would carry. A
BatchNormalization's moving statistics are not learned by gradients: they take Δ as it is. The
state is in the checkpoint (rundir.py), so a resumed run goes on with it; unit pruning's rebuild
cuts it as it cuts the weights (pruning.Pruner.cut).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum

import numpy as np

from fedprune.coordinator.global_model import Cutter
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ConfigError

log = logging.getLogger("fedprune.coordinator")


class ServerRule(StrEnum):
    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"
    YOGI = "yogi"
    ADAGRAD = "adagrad"


DEFAULT_LR = {
    ServerRule.SGD: 1.0,
    ServerRule.MOMENTUM: 1.0,
    ServerRule.ADAM: 0.01,
    ServerRule.YOGI: 0.01,
    ServerRule.ADAGRAD: 0.03,
}
"""The server learning rate when none is given (docs/benchmarks.md, "Convergence on skewed data":
tuned on a seed and a skew the tables do not report)."""


class ServerOptimizer:
    """Takes each round's step; ``lr`` 0 = the rule's default (:data:`DEFAULT_LR`)."""

    def __init__(
        self,
        rule: ServerRule | str = ServerRule.SGD,
        *,
        lr: float = 0.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        try:
            self.rule = ServerRule(rule)
        except ValueError:
            rules = ", ".join(r.value for r in ServerRule)
            raise ConfigError(f"unknown server optimizer {rule!r} (one of {rules})") from None
        self.lr = lr or DEFAULT_LR[self.rule]
        self.momentum, self.beta1, self.beta2, self.tau = momentum, beta1, beta2, tau
        self.m: list[np.ndarray] = []  # per weight, float64; empty until the first step
        self.v: list[np.ndarray] = []

    @property
    def plain(self) -> bool:
        """Whether it is FedAvg's own step (sgd at lr 1): no state, the weights as before."""
        return self.rule is ServerRule.SGD and self.lr == 1.0

    def step(self, model: Model, delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The new weights of ``model`` after the round's aggregate ``delta``."""
        weights = model.weights
        if not self.m and not self.plain:
            self.m = [np.zeros(w.shape, np.float64) for w in weights]
            self.v = [np.full(w.shape, self.tau**2) for w in weights]
        out = []
        for i, (w, d) in enumerate(zip(weights, delta, strict=True)):
            d = np.asarray(d, np.float64)
            if not self.plain and i not in model.exact:
                d = self._direction(i, d)
            mask = model.masks[i]
            if mask is not None and not self.plain:
                self.m[i] *= mask
                d = d * mask
            out.append((w.astype(np.float64) + d).astype(np.float32))
        return out

    def _direction(self, i: int, d: np.ndarray) -> np.ndarray:
        """How far weight ``i`` moves for its aggregate ``d``; updates the state."""
        m, v = self.m, self.v
        if self.rule is ServerRule.SGD:
            return self.lr * d
        if self.rule is ServerRule.MOMENTUM:
            m[i] = self.momentum * m[i] + d
            return self.lr * m[i]
        m[i] = self.beta1 * m[i] + (1 - self.beta1) * d
        square = np.square(d)
        if self.rule is ServerRule.ADAGRAD:
            v[i] = v[i] + square
        elif self.rule is ServerRule.YOGI:
            v[i] = v[i] - (1 - self.beta2) * square * np.sign(v[i] - square)
        else:
            v[i] = self.beta2 * v[i] + (1 - self.beta2) * square
        step: np.ndarray = self.lr * m[i] / (np.sqrt(v[i]) + self.tau)
        return step

    def cut(self, cut: Cutter | None) -> None:
        """The model was rebuilt smaller: cut the state as its weights were (``None``: start
        again from zero)."""
        if cut is None:
            self.reset("the model was rebuilt smaller")
        elif self.m:
            self.m, self.v = cut(self.m), cut(self.v)

    def reset(self, why: str) -> None:
        """Start the state again from zero (the model changed shape)."""
        if self.m:
            log.info("the server optimizer (%s) starts again: %s", self.rule.value, why)
        self.m, self.v = [], []

    def state(self) -> dict[str, np.ndarray]:
        """The state by name, for the checkpoint (empty: none yet, or none to keep)."""
        return {
            **{f"m{i:03d}": a for i, a in enumerate(self.m)},
            **{f"v{i:03d}": a for i, a in enumerate(self.v)},
        }

    def load(self, state: Mapping[str, np.ndarray], shapes: Sequence[tuple[int, ...]]) -> None:
        """Continue from a checkpoint's :meth:`state` for weights of ``shapes``."""
        count = sum(name.startswith("m") for name in state)
        m = [np.asarray(state[f"m{i:03d}"], np.float64) for i in range(count)]
        v = [np.asarray(state[f"v{i:03d}"], np.float64) for i in range(count)]
        if m and [a.shape for a in m] != [tuple(s) for s in shapes]:
            raise ConfigError("the server optimizer's state does not fit the model's weights")
        self.m, self.v = m, v
