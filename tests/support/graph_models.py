"""Graphs of layers whose channels are coupled, for unit pruning (coordinator/structure.py): each
builder takes a width, so that every architecture is tested at two.

A test helper, kept out of the installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tf_keras

layers = tf_keras.layers


def _conv_bn(x: Any, filters: int, size: int = 3, **options: Any) -> Any:
    x = layers.Conv2D(filters, size, padding="same", use_bias=False, **options)(x)
    return layers.BatchNormalization()(x)


def residual(width: int) -> tf_keras.Model:
    """An identity block and a projected, strided one (both inputs of each Add coupled)."""
    x = inputs = layers.Input((8, 8, 1))
    x = layers.ReLU()(_conv_bn(x, width))
    y = _conv_bn(layers.ReLU()(_conv_bn(x, width)), width)
    x = layers.ReLU()(layers.Add()([x, y]))
    y = _conv_bn(layers.ReLU()(_conv_bn(x, 2 * width, strides=2)), 2 * width)
    x = layers.Conv2D(2 * width, 1, strides=2)(x)
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


def inverted(width: int) -> tf_keras.Model:
    """MobileNetV2's inverted residual: 1x1 expansion, depthwise 3x3, linear 1x1 projection,
    ReLU6, added to its input."""
    x = inputs = layers.Input((8, 8, 1))
    x = layers.ReLU(6.0)(_conv_bn(x, width))
    for _ in range(2):
        y = layers.Conv2D(3 * width, 1, activation="relu6")(x)
        y = layers.DepthwiseConv2D(3, padding="same")(y)
        y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
        y = layers.Conv2D(width, 1)(y)
        x = layers.Add()([x, y])
    x = layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


def separable(width: int) -> tf_keras.Model:
    """DS-CNN's depthwise-separable blocks, a SeparableConv2D and a depth multiplier of 2, average
    pooling, Flatten into a Dense."""
    x = inputs = layers.Input((8, 8, 1))
    x = layers.ReLU()(_conv_bn(x, width))
    x = layers.SeparableConv2D(width, 3, padding="same", activation="relu")(x)
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu")(x)  # valid: 6x6
    x = layers.ReLU()(_conv_bn(x, width, 1))
    x = layers.AveragePooling2D()(x)
    x = layers.Dense(2 * width, activation="relu")(layers.Flatten()(x))
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


def concatenated(width: int) -> tf_keras.Model:
    """An inception block: 1x1 and 3x3 branches concatenated, then a valid convolution, max
    pooling, and a sigmoid Dense (whose removed units give 0.5 to the next one)."""
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    a = layers.Conv2D(width, 1, activation="relu")(x)
    b = layers.Conv2D(2 * width, 3, padding="same", activation="relu")(x)
    x = layers.Concatenate()([a, b, x])
    x = layers.Conv2D(2 * width, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dense(width, activation="sigmoid")(layers.Flatten()(x))
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


def squeeze_excite(width: int) -> tf_keras.Model:
    """A squeeze-and-excite gate (global pooling, two Dense, a Reshape) multiplying the channels,
    and a spatial gate of one channel broadcast over all of them."""
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(2 * width, 3, padding="same", activation="relu")(x)
    gate = layers.Dense(width, activation="relu")(layers.GlobalAveragePooling2D()(x))
    gate = layers.Reshape((1, 1, 2 * width))(layers.Dense(2 * width, activation="sigmoid")(gate))
    x = layers.Multiply()([x, gate])
    x = layers.Multiply()([x, layers.Conv2D(1, 1, activation="sigmoid")(x)])
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    x = layers.GlobalMaxPooling2D()(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


def sequence(width: int) -> tf_keras.Model:
    """Rows as time steps: Conv1D, zero padding, Subtract and Maximum of two branches, 1-D
    pooling."""
    x = inputs = layers.Input((8, 8))
    x = layers.Conv1D(width, 3, padding="same", activation="relu")(x)
    a = layers.Conv1D(width, 3, activation="tanh")(layers.ZeroPadding1D(1)(x))
    b = layers.Conv1D(width, 1)(x)
    x = layers.Maximum()([layers.Subtract()([a, b]), x])
    x = layers.AveragePooling1D()(x)
    x = layers.GlobalAveragePooling1D()(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


ARCHITECTURES: dict[str, Callable[[int], tf_keras.Model]] = {
    "residual": residual,
    "inverted": inverted,
    "separable": separable,
    "concatenated": concatenated,
    "squeeze-excite": squeeze_excite,
    "sequence": sequence,
}
