"""What a Keras model learns, read from its output (edge_client/task.py scores it)."""

from __future__ import annotations

import math

import tf_keras

from fedprune.edge_client.task import Task
from fedprune.protocol.errors import ConfigError

layers = tf_keras.layers


def task_of(model: tf_keras.Model, asked: str = "auto", source: str | None = None) -> Task:
    """What ``model`` learns (``asked``: a ``Task`` name, or ``auto``: from its output).

    A classifier has one output of shape (batch, classes) made by a softmax: every trainer's
    loss and the evaluation assume probabilities, and a logits model would train to chance
    without an error. A reconstruction (an autoencoder) has one output with as many values per
    sample as its input. Anything else is refused here with one line."""
    source = source or f"model {model.name!r}"
    shape = model.output_shape
    if not isinstance(shape, tuple):
        raise ConfigError(f"{source}: the model must have one output, got {len(shape)}")
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    softmax = isinstance(last, layers.Softmax) or activation is tf_keras.activations.softmax
    ends_in = getattr(activation, "__name__", None) or type(last).__name__
    inputs = math.prod(d or 0 for d in model.input_shape[1:])
    outputs = math.prod(d or 0 for d in shape[1:])
    if asked == "auto":
        asked = Task.RECONSTRUCT if not softmax and outputs == inputs else Task.CLASSIFY
    if asked == Task.RECONSTRUCT:
        if outputs != inputs:
            raise ConfigError(
                f"{source}: a reconstruction outputs as many values as its input has ({inputs});"
                f" the model outputs {shape}"
            )
        return Task.RECONSTRUCT
    if len(shape) != 2:
        raise ConfigError(
            f"{source}: the model must have one output of shape (batch, classes), got {shape}"
        )
    if not softmax:
        raise ConfigError(
            f"{source}: the output layer {last.name!r} ends in {ends_in!r}, not a softmax;"
            " fedprune trains classifiers that output probabilities (give it"
            " activation='softmax') and autoencoders whose output has the input's size"
        )
    return Task.CLASSIFY
