"""The global model: built-in presets for 8x8 digits, or a user's Keras file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tf_keras

from fedprune.converters.strip import load_keras
from fedprune.edge_client.keras_trainer import check_architecture
from fedprune.protocol.errors import ConfigError

layers = tf_keras.layers


def cnn() -> tf_keras.Model:
    """A small CNN for 8x8x1 images: Conv16 -> Dense128 -> 10 (132,650 parameters)."""
    return tf_keras.Sequential(
        [
            layers.Input((8, 8, 1)),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ],
        name="cnn",
    )


def mlp() -> tf_keras.Model:
    """A 64-64-64-10 MLP for flattened 8x8 images."""
    return tf_keras.Sequential(
        [
            layers.Input((64,)),
            layers.Dense(64, activation="relu"),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ],
        name="mlp",
    )


PRESETS: dict[str, Callable[[], tf_keras.Model]] = {"cnn": cnn, "mlp": mlp}


def build(name_or_path: str, *, seed: int = 0) -> tf_keras.Model:
    """A preset by name, or the model in a .keras/.h5 file (a ``ConfigError`` if it is not one)."""
    tf_keras.utils.set_random_seed(seed)
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        presets = ", ".join(PRESETS)
        raise ConfigError(f"unknown model {name_or_path!r}: not a preset ({presets}) nor a file")
    model = load_keras(path)
    check_classifier(model, str(path))
    try:
        check_architecture(model.to_json())  # what devices would refuse to build
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return model


def check_classifier(model: tf_keras.Model, source: str) -> None:
    """fedprune trains classifiers that output class probabilities: one output of shape
    (batch, classes) made by a softmax. Every trainer's loss, the evaluation and the exports
    assume it; a logits model would train to chance without an error, so it is refused here."""
    shape = model.output_shape
    if not isinstance(shape, tuple) or len(shape) != 2:
        raise ConfigError(
            f"{source}: the model must have one output of shape (batch, classes), got {shape}"
        )
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    if isinstance(last, layers.Softmax) or activation is tf_keras.activations.softmax:
        return
    ends_in = getattr(activation, "__name__", None) or type(last).__name__
    raise ConfigError(
        f"{source}: the output layer {last.name!r} ends in {ends_in!r}, not a softmax; fedprune"
        " trains classifiers that output probabilities: give it activation='softmax'"
    )
