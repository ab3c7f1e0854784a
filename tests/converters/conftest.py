"""Shared, once-per-session fixtures: small digits models (dense and 80% pruned) and their files,
and LiteRT training artifacts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot
import tf_keras
from sklearn.datasets import load_digits
from training_artifacts import Cases

from fedprune import device_profiles
from fedprune.converters.strip import strip
from fedprune.device_profiles import DeviceProfile

SPARSITY = 0.8
Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="session")
def digits() -> Digits:
    """Training and held-out digits as 8x8x1 images in [0, 1] (1,347 and 450 samples)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1347], order[1347:]
    return x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64)


def _cnn(x: np.ndarray, y: np.ndarray) -> tf_keras.Model:
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((8, 8, 1)),
            tf_keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> dict[str, Path]:
    """Saved files: a dense CNN, the same CNN fine-tuned under an 80% mask (wrapped and stripped),
    and the held-out set."""
    x_train, y_train, x_test, y_test = digits
    model = _cnn(x_train, y_train)
    root = tmp_path_factory.mktemp("trained")
    model.save(root / "dense.keras")  # before wrapping: the wrapper shares (and prunes) its layers
    schedule = tfmot.sparsity.keras.ConstantSparsity(SPARSITY, begin_step=0, frequency=1)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    wrapped.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep()]
    wrapped.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
    wrapped.save(root / "wrapped.keras")
    strip(wrapped).save(root / "stripped.keras")
    np.savez(root / "heldout.npz", x=x_test, y=y_test)
    names = ("dense.keras", "wrapped.keras", "stripped.keras", "heldout.npz")
    return {name: root / name for name in names}


@pytest.fixture(scope="session")
def training_cases() -> Cases:
    """Training artifacts of trainable_models.BUILDS by name, each built when a test first asks
    for it and kept for the session: the test_trainable files share them."""
    return Cases()


@pytest.fixture(scope="session")
def pruned(trained: dict[str, Path]) -> tf_keras.Model:
    """The 80%-pruned, stripped CNN as a model object."""
    from fedprune.converters.strip import load_keras

    return load_keras(trained["stripped.keras"])


@pytest.fixture(scope="session")
def dense(trained: dict[str, Path]) -> tf_keras.Model:
    """The CNN before pruning."""
    from fedprune.converters.strip import load_keras

    return load_keras(trained["dense.keras"])


@pytest.fixture
def make_run(tmp_path: Path, trained: dict[str, Path]) -> Callable[..., Path]:
    """``make_run(model="stripped.keras")``: a run directory holding that model and heldout.npz."""

    def make(model: str = "stripped.keras") -> Path:
        run = tmp_path / "run"
        (run / "model").mkdir(parents=True)
        (run / "model" / model).write_bytes(trained[model].read_bytes())
        (run / "heldout.npz").write_bytes(trained["heldout.npz"].read_bytes())
        return run

    return make


@pytest.fixture(scope="session")
def make_profile() -> Callable[..., DeviceProfile]:
    """``make_profile(**fields)``: the generic x86-64 profile with some fields replaced."""
    base = device_profiles.load("generic-x86-64")

    def make(**fields: Any) -> DeviceProfile:
        fields.setdefault("cores", 1)
        return dataclasses.replace(base, **fields)

    return make


@pytest.fixture
def write_profile(tmp_path: Path) -> Callable[..., Path]:
    """``write_profile(name, **fields)``: a user profile file (the generic one, changed) on disk."""

    def write(name: str, **fields: Any) -> Path:
        table = device_profiles.load("generic-x86-64").to_dict() | {"name": name} | fields
        lines = [f"{key} = {_toml(value)}" for key, value in table.items()]
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
