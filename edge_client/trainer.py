"""Local trainers behind one small interface; the backend is chosen by name from a table.

A trainer gets the round's global model (weights + masks), trains on the device's data keeping
masked weights exactly zero, and returns the new weights. Backends import their heavy dependencies
lazily, so importing this module never imports TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import numpy as np

from fedprune.edge_client.task import Evaluation, Task
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ConfigError, WireError
from fedprune.protocol.messages import PROX, SCAFFOLD, SCHEDULE, Spec

EpochHook = Callable[[int], None]

RULES = (PROX, SCHEDULE, SCAFFOLD)
"""The local training rules (``Hello.training``) every trainer here follows: FedProx's term
(``Spec.prox_mu``), a round's learning rate, and SCAFFOLD's corrected steps (``Spec.scaffold``;
edge_client/control.py keeps the device's control variate)."""


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of sample indices in full batches: a fresh permutation, the last batch topped up
    from its start. Every backend uses this, so the same seed gives the same steps everywhere
    (and fixed-size batches are what a TFLite training signature needs)."""
    order = rng.permutation(n)
    count = max(1, -(-n // batch_size))
    padded = np.resize(order, count * batch_size)  # np.resize repeats from the start
    return list(padded.reshape(count, batch_size))


def calibrated(
    weights: list[np.ndarray], statistics: Iterable[dict[int, np.ndarray]]
) -> list[np.ndarray]:
    """``weights`` with each BatchNormalization's moving mean and variance replaced by the
    average, over the batches of one pass through the device's data, of the batch statistics
    they follow in training (``statistics``: one dict per batch, by weight index).

    A few local epochs at tf_keras's momentum of 0.99 move the moving statistics only part of
    the way toward what the new weights give, so the model inferred far worse than it trained
    (measured: a MobileNetV2-style model at 0.10 held-out accuracy after 5 rounds, 0.96 with
    this). Averaging the batch statistics (PreciseBN, Wu and Johnson 2021) sets them where
    training leaves them; the coordinator averages them over the devices like every weight."""
    total: dict[int, np.ndarray] = {}
    count = 0
    for batch in statistics:
        count += 1
        for i, value in batch.items():
            total[i] = total.get(i, 0.0) + np.asarray(value, np.float64)
    out = list(weights)
    for i, value in total.items():
        out[i] = (value / count).astype(np.float32)
    return out


class Trainer(ABC):
    """Trains one model architecture (given by the run's ``Spec``) round after round.

    Backends that train from a TFLite artifact set ``needs_artifact`` and receive its bytes.
    """

    needs_artifact = False

    def __init__(self, spec: Spec, *, artifact: bytes | None = None) -> None:
        if not (math.isfinite(spec.prox_mu) and spec.prox_mu >= 0):
            raise WireError(f"the run's prox_mu must be finite and >= 0, got {spec.prox_mu!r}")
        self.spec = spec
        self.task = Task(spec.task)

    @property
    def batch_size(self) -> int:
        """The batch size it trains with (the spec's, unless the backend fixes its own)."""
        return self.spec.batch_size

    @abstractmethod
    def fit(
        self,
        model: Model,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        seed: int,
        on_epoch: EpochHook | None = None,
        learning_rate: float | None = None,
        correction: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Train from ``model`` for ``epochs`` and return the new weights (masked entries zero);
        ``on_epoch`` hears the number of epochs done after each one. ``learning_rate`` is this
        round's (``None``: the Spec's); with ``spec.prox_mu`` > 0 the loss has FedProx's term,
        ``prox_mu / 2 * ||w - w_round||^2`` over the trainable weights, ``model`` the anchor.
        With ``spec.scaffold``, ``correction`` (one array per weight, ``c - c_i``; ``None``:
        zeros) is added to every step's gradient of each trainable weight before the
        optimizer takes it."""

    @abstractmethod
    def mean_gradient(self) -> list[np.ndarray]:
        """SCAFFOLD (``spec.scaffold``): the mean over the last ``fit``'s steps of each weight's
        raw gradient (that of the objective, before the correction), in ``get_weights`` order,
        zeros for the weights no optimizer trains (BatchNormalization's moving statistics).

        It is SCAFFOLD's option-II control variate ``c_i - c + (x - y_i) / (K lr)`` as plain SGD
        would give it, taken exactly whatever the device's optimizer (momentum, Adam)."""

    def _check_scaffold(self, correction: list[np.ndarray] | None) -> None:
        """A ``correction`` is for a trainer built for a SCAFFOLD run only."""
        if correction is not None and not self.spec.scaffold:
            raise ValueError("a SCAFFOLD correction given to a trainer of a run without SCAFFOLD")

    def _rate(self, learning_rate: float | None) -> float:
        """The learning rate a ``fit`` trains at: ``learning_rate``, else the Spec's. Both come
        from the coordinator's messages: one that is not finite and positive is a ``WireError``
        (the round fails; the device stays)."""
        lr = self.spec.learning_rate if learning_rate is None else float(learning_rate)
        if not (math.isfinite(lr) and lr > 0):
            raise WireError(f"the round's learning rate must be finite and > 0, got {lr!r}")
        return lr

    @abstractmethod
    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> Evaluation: ...


# name -> "module:Class"; a new backend is one line here.
BACKENDS: dict[str, str] = {
    "keras": "fedprune.edge_client.keras_trainer:KerasTrainer",
    "litert": "fedprune.edge_client.litert_trainer:LiteRTTrainer",
}


# What each backend imports when it is built, checked when a client starts.
REQUIRES: dict[str, tuple[str, ...]] = {
    "keras": ("tensorflow", "tf_keras"),
    "litert": ("ai_edge_litert",),
}


def check_backend(name: str) -> None:
    """Fail at start-up, not at the first round, if a backend is unknown or cannot be imported."""
    if name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown trainer backend {name!r} (available: {known})")
    for module in REQUIRES.get(name, ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(
                f"trainer {name!r} needs {module}, which is not installed;"
                " install it or choose another backend"
            )


def backend_class(name: str) -> type[Trainer]:
    """The trainer class of a backend (imported now; its heavy imports wait for construction)."""
    check_backend(name)
    module_name, _, class_name = BACKENDS[name].partition(":")
    try:
        cls: type[Trainer] = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ConfigError(
            f"trainer {name!r} needs {exc.name or 'a missing package'};"
            " install it or choose another backend"
        ) from exc
    return cls


def make_trainer(name: str, spec: Spec, *, artifact: bytes | None = None) -> Trainer:
    cls = backend_class(name)
    # Backends import their heavy dependencies when built, not when imported: catch both.
    try:
        return cls(spec, artifact=artifact)
    except ImportError as exc:
        raise ConfigError(
            f"trainer {name!r} needs {exc.name or 'a missing package'};"
            " install it or choose another backend"
        ) from exc
