"""Local trainers behind one small interface; the backend is chosen by name from a table.

A trainer gets the round's global model (weights + masks), trains on the device's data keeping
masked weights exactly zero, and returns the new weights. Backends import their heavy dependencies
lazily, so importing this module never imports TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from edge_client.codec import Model
from edge_client.errors import ConfigError
from edge_client.wire import Spec


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    loss: float
    accuracy: float
    n: int


class Trainer(ABC):
    """Trains one model architecture (given by the run's ``Spec``) round after round."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec

    @abstractmethod
    def fit(
        self, model: Model, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int
    ) -> list[np.ndarray]:
        """Train from ``model`` for ``epochs`` and return the new weights (masked entries zero)."""

    @abstractmethod
    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> Evaluation: ...


# name -> "module:Class"; a new backend is one line here.
BACKENDS: dict[str, str] = {
    "keras": "edge_client.keras_trainer:KerasTrainer",
}


# What each backend imports when it is built, checked when a client starts.
REQUIRES: dict[str, tuple[str, ...]] = {
    "keras": ("tensorflow", "tf_keras"),
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


def make_trainer(name: str, spec: Spec) -> Trainer:
    check_backend(name)
    module_name, _, class_name = BACKENDS[name].partition(":")
    # Backends import their heavy dependencies when built, not when imported: catch both.
    try:
        cls: type[Trainer] = getattr(importlib.import_module(module_name), class_name)
        return cls(spec)
    except ImportError as exc:
        raise ConfigError(
            f"trainer {name!r} needs {exc.name or 'a missing package'};"
            " install it or choose another backend"
        ) from exc
