"""The global model: built-in presets for 8x8 digits, or a user's Keras file.

Besides the small ``cnn`` and ``mlp``, four presets follow the MLPerf Tiny reference models,
scaled to 8x8x1 digits (their own data sets cannot be fetched here): ``resnet8`` (image
classification: residual stacks of 16, 32 and 64 filters), ``dscnn`` (keyword spotting: a
convolution and four depthwise-separable blocks), ``mobilenet`` (visual wake words: MobileNetV1
blocks at width 0.25) and ``autoencoder`` (anomaly detection: a fully connected autoencoder, which
reconstructs its input: edge_client/task.py). All four train on devices without TensorFlow (the
litert trainer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import tf_keras

from fedprune.converters.strip import load_keras
from fedprune.converters.task import task_of
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


def _conv_bn_relu(x: Any, filters: int, size: int, strides: int = 1) -> Any:
    x = layers.Conv2D(filters, size, strides=strides, padding="same", use_bias=False)(x)
    return layers.ReLU()(layers.BatchNormalization()(x))


def resnet8() -> tf_keras.Model:
    """MLPerf Tiny's ResNet-8 on 8x8x1: a 16-filter stem, three residual stacks (16, 32, 64
    filters; the last two halve the resolution, with a 1x1 projection on their shortcut), global
    average pooling, 10 classes (78,042 parameters)."""
    x = inputs = layers.Input((8, 8, 1))
    x = _conv_bn_relu(x, 16, 3)
    for filters, strides in ((16, 1), (32, 2), (64, 2)):
        y = _conv_bn_relu(x, filters, 3, strides)
        y = layers.BatchNormalization()(
            layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
        )
        if strides > 1:
            x = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(x)
        x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="resnet8")


def _separable(x: Any, filters: int, strides: int = 1) -> Any:
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    return _conv_bn_relu(x, filters, 1)


def dscnn() -> tf_keras.Model:
    """MLPerf Tiny's DS-CNN (keyword spotting) on 8x8x1: a 64-filter convolution, four
    depthwise-separable blocks of 64, global average pooling, 10 classes."""
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Dropout(0.2)(_conv_bn_relu(x, 64, 3))
    for _ in range(4):
        x = _separable(x, 64)
    x = layers.Dropout(0.4)(layers.GlobalAveragePooling2D()(x))
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="dscnn")


def mobilenet() -> tf_keras.Model:
    """MLPerf Tiny's MobileNetV1 at width 0.25 (visual wake words) on 8x8x1: an 8-filter stem,
    depthwise-separable blocks of 16 to 64 filters (two halve the resolution), global average
    pooling, 10 classes."""
    x = inputs = layers.Input((8, 8, 1))
    x = _conv_bn_relu(x, 8, 3)
    for filters, strides in ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
        x = _separable(x, filters, strides)
    x = layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="mobilenet")


def autoencoder() -> tf_keras.Model:
    """MLPerf Tiny's fully connected autoencoder (anomaly detection) on 8x8x1: the flattened 64
    values through four Dense-BN-ReLU layers of 64, a bottleneck of 8 and four more of 64, back
    to 64 linear outputs (a reconstruction: trained on normal samples, their error scores
    anomalies)."""
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Flatten()(x)
    for units in (64, 64, 64, 64, 8, 64, 64, 64, 64):
        x = layers.ReLU()(layers.BatchNormalization()(layers.Dense(units)(x)))
    return tf_keras.Model(inputs, layers.Dense(64)(x), name="autoencoder")


PRESETS: dict[str, Callable[[], tf_keras.Model]] = {
    "cnn": cnn,
    "mlp": mlp,
    "resnet8": resnet8,
    "dscnn": dscnn,
    "mobilenet": mobilenet,
    "autoencoder": autoencoder,
}


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
    task_of(model, source=str(path))
    try:
        check_architecture(model.to_json())  # what devices would refuse to build
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return model
