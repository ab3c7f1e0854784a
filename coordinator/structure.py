"""Structural pruning: whole Dense units and Conv2D filters, and the smaller model without them.

A *unit* is one output of a Dense layer (a column of its kernel) or one filter of a Conv2D layer
(the last axis of its kernel). Unit masks live in the TF-MOT wrappers' own mask variables, as
weight masks do (a pruned unit is a slice of zeros there), so stripping, checkpoints and the wire
see nothing new. :func:`rebuild` then makes the physically smaller model: fewer units and filters,
the next layer's inputs cut to match (after Flatten too), BatchNormalization carried along, and
what a removed unit still gave the next layer, a constant, folded into that layer's bias. It
gives the same outputs as the masked model it came from.

Unit pruning needs a chain of layers (Sequential, or a functional model without branches) made of
the layers in :data:`_CARRY`, :data:`_UNITS` and BatchNormalization; :func:`check_chain` says
which layer is not one. The last Dense or Conv2D layer (the classes) is never unit-pruned.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from fedprune.protocol.errors import ConfigError

log = logging.getLogger("fedprune.coordinator")

layers = tf_keras.layers

_UNITS: dict[type, str] = {layers.Dense: "units", layers.Conv2D: "filters"}
"""Layers whose units can be removed, and the config key that counts them."""
_ACTIVATIONS = (layers.Activation, layers.ReLU, layers.LeakyReLU, layers.ELU)
_CARRY = (
    layers.InputLayer,
    layers.Dropout,
    layers.MaxPooling2D,
    layers.AveragePooling2D,
    layers.GlobalAveragePooling2D,
    layers.GlobalMaxPooling2D,
    *_ACTIVATIONS,
)
"""Layers that pass each channel through on its own: a constant channel stays constant."""


def unit_layers(model: tf_keras.Model) -> list[str]:
    """The layers whose units may be pruned: every Dense and Conv2D layer but the last."""
    names = [layer.name for layer in model.layers if type(layer) in _UNITS]
    return names[:-1]


def check_chain(model: tf_keras.Model) -> None:
    """``ConfigError`` unless :func:`rebuild` can rebuild ``model``: a chain of supported layers,
    each taking the one before it."""
    supported = (*_CARRY, *_UNITS, layers.BatchNormalization, layers.Flatten)
    for layer in model.layers:
        if type(layer) not in supported:
            raise ConfigError(
                f"unit pruning cannot rebuild layer {layer.name!r} ({type(layer).__name__}): it"
                " supports chains of Dense, Conv2D, BatchNormalization, Flatten, pooling,"
                " Dropout and activation layers"
            )
        if type(layer) is layers.BatchNormalization and layer.axis not in (
            [-1],
            [len(layer.input_shape) - 1],
        ):
            raise ConfigError(f"unit pruning needs {layer.name!r} to normalize the last axis")
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise ConfigError(f"unit pruning needs channels_last data; {layer.name!r} is not")
        if getattr(layer, "groups", 1) != 1:
            raise ConfigError(f"unit pruning cannot rebuild grouped convolution {layer.name!r}")
    last = max(i for i, layer in enumerate(model.layers) if type(layer) in _UNITS)
    for layer in model.layers[:last]:  # softmax mixes a layer's units: only the output has it
        activation = getattr(layer, "activation", None)
        if "softmax" in getattr(activation, "__name__", ""):  # tf.nn.softmax is softmax_v2
            raise ConfigError(f"unit pruning cannot remove units of softmax layer {layer.name!r}")
    if isinstance(model, tf_keras.Sequential):
        return
    for before, layer in zip(model.layers, model.layers[1:], strict=False):
        nodes = layer.inbound_nodes
        inbound = tf.nest.flatten(nodes[0].inbound_layers) if len(nodes) == 1 else []
        if len(inbound) != 1 or inbound[0] is not before or len(before.outbound_nodes) != 1:
            raise ConfigError(
                f"unit pruning needs a chain of layers: {layer.name!r} does not only take"
                f" {before.name!r}"
            )


def silence(model: tf_keras.Model, name: str, units: np.ndarray) -> None:
    """Make the removed units of layer ``name`` give exactly zero: their bias, and the scale,
    shift and running mean of the BatchNormalization layers after it, held at zero (so that,
    with an activation of zero that is zero, nothing is left for the next layer to fold, and a
    same-padded convolution next does not keep them)."""
    found = False
    for layer in model.layers:
        if layer.name == name:
            found = True
            variables = [layer.bias] if getattr(layer, "use_bias", False) else []
        elif found and type(layer) in _UNITS:
            break
        elif found and type(layer) is layers.BatchNormalization:
            variables = [layer.gamma, layer.beta, layer.moving_mean]
        else:
            continue
        for variable in variables:
            if variable is not None:
                variable.assign(variable.numpy() * units)


def unit_norms(kernel: np.ndarray, order: int) -> np.ndarray:
    """Each unit's L1 (``order`` 1) or L2 norm: over every axis of the kernel but the last."""
    flat = np.abs(kernel.reshape(-1, kernel.shape[-1]))
    norms = flat.sum(axis=0) if order == 1 else np.sqrt((flat**2).sum(axis=0))
    return np.asarray(norms, np.float64)


def alive(mask: np.ndarray) -> np.ndarray:
    """Which units of a kernel mask keep any weight."""
    return np.asarray(mask.reshape(-1, mask.shape[-1]).any(axis=0), bool)


@dataclass
class _Flow:
    """What flows along the chain: of the original channels (the last axis), those ``kept``;
    ``const`` the value each removed one carries; ``source`` the unit layer they come from and
    ``unit`` which of its units each channel is."""

    kept: np.ndarray
    const: np.ndarray
    source: str
    unit: np.ndarray

    @classmethod
    def whole(cls, width: int, source: str = "") -> _Flow:
        every = np.arange(width)
        return cls(kept=every, const=np.zeros(width, np.float32), source=source, unit=every)

    def removed(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.const.size), self.kept)


def rebuild(
    model: tf_keras.Model, masks: dict[str, np.ndarray], keep: dict[str, np.ndarray]
) -> tuple[tf_keras.Model, dict[str, np.ndarray]]:
    """The model without the units ``keep`` leaves out (by layer name, a boolean per unit), with
    the weights of ``model`` and its kernel ``masks`` (by layer name) cut to match. A removed unit
    whose constant output cannot be folded into the next layer (a Conv2D with ``same`` padding or
    no bias) is kept. Returns the new model and its kernel masks."""
    keep = {name: np.array(units, bool) for name, units in keep.items()}
    while True:
        stuck: dict[str, set[int]] = {}
        config, weights, new_masks = _walk(model, masks, keep, stuck)
        if not stuck:
            break
        for name, units in stuck.items():
            keep[name][sorted(units)] = True
            log.warning(
                "unit pruning keeps %d removed unit(s) of %s in the rebuilt model: the next"
                " convolution pads with zeros where they give a constant, so no bias can stand"
                " for them",
                len(units),
                name,
            )
    rebuilt = type(model).from_config(config)
    for layer in rebuilt.layers:
        if layer.name in weights:
            layer.set_weights(weights[layer.name])
    return rebuilt, new_masks


def _walk(
    model: tf_keras.Model,
    masks: dict[str, np.ndarray],
    keep: dict[str, np.ndarray],
    stuck: dict[str, set[int]],
) -> tuple[dict[str, Any], dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    config = copy.deepcopy(model.get_config())
    entries = {entry["config"]["name"]: entry["config"] for entry in config["layers"]}
    flow = _Flow.whole(int(model.input_shape[-1]))
    weights: dict[str, list[np.ndarray]] = {}
    new_masks: dict[str, np.ndarray] = {}
    for layer in model.layers:
        entries[layer.name].pop("build_config", None)  # the old input shape
        if type(layer) in _UNITS:
            flow = _unit(layer, flow, masks, keep, stuck, weights, new_masks, entries[layer.name])
        elif type(layer) is layers.BatchNormalization:
            flow = _batch_norm(layer, flow, weights)
        elif type(layer) is layers.Flatten:
            positions = int(np.prod(layer.input_shape[1:-1]))
            width = flow.const.size
            kept = (np.arange(positions)[:, None] * width + flow.kept[None, :]).reshape(-1)
            flow = _Flow(
                kept=kept,
                const=np.tile(flow.const, positions),
                source=flow.source,
                unit=np.tile(flow.unit, positions),
            )
        elif isinstance(layer, _ACTIVATIONS):
            flow.const = _apply(layer, flow.const)
    return config, weights, new_masks


def _unit(
    layer: Any,
    flow: _Flow,
    masks: dict[str, np.ndarray],
    keep: dict[str, np.ndarray],
    stuck: dict[str, set[int]],
    weights: dict[str, list[np.ndarray]],
    new_masks: dict[str, np.ndarray],
    entry: dict[str, Any],
) -> _Flow:
    """Cut one Dense or Conv2D layer's inputs to what flows in (folding the removed inputs'
    constants into its bias) and its units to those kept."""
    kernel, *rest = (np.asarray(w, np.float32) for w in layer.get_weights())
    bias = rest[0].copy() if rest else None
    mask = masks.get(layer.name, np.ones_like(kernel))
    removed = flow.removed()
    carrying = removed[flow.const[removed] != 0]
    if carrying.size:
        foldable = bias is not None and (type(layer) is layers.Dense or layer.padding == "valid")
        if foldable:
            spread = kernel[..., carrying, :].reshape(-1, carrying.size, kernel.shape[-1])
            bias += np.einsum("pio,i->o", spread, flow.const[carrying])
        else:
            stuck.setdefault(flow.source, set()).update(int(u) for u in flow.unit[carrying])
    kernel = np.take(kernel, flow.kept, axis=-2)
    mask = np.take(mask, flow.kept, axis=-2)
    units = keep.get(layer.name, np.ones(kernel.shape[-1], bool))
    out = _Flow.whole(kernel.shape[-1], source=layer.name)
    out.kept = np.flatnonzero(units)
    # A removed unit's kernel is zero: it gives activation(bias) everywhere.
    dead = bias[~units] if bias is not None else np.zeros(int((~units).sum()), np.float32)
    out.const[~units] = _apply(layers.Activation(layer.activation), dead)
    weights[layer.name] = [kernel[..., units]] + ([bias[units]] if bias is not None else [])
    new_masks[layer.name] = mask[..., units]
    entry[_UNITS[type(layer)]] = int(units.sum())
    return out


def _batch_norm(layer: Any, flow: _Flow, weights: dict[str, list[np.ndarray]]) -> _Flow:
    """Carry a BatchNormalization along: its kept channels, and the removed ones' constants
    normalized as it normalizes them."""
    width = flow.const.size
    gamma = np.ones(width, np.float32) if layer.gamma is None else layer.gamma.numpy()
    beta = np.zeros(width, np.float32) if layer.beta is None else layer.beta.numpy()
    scale = gamma / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
    flow.const = ((flow.const - layer.moving_mean.numpy()) * scale + beta).astype(np.float32)
    weights[layer.name] = [np.asarray(w)[flow.kept] for w in layer.get_weights()]
    return flow


def _apply(activation: Any, values: np.ndarray) -> np.ndarray:
    """An elementwise activation layer on a vector of constants."""
    if values.size == 0:
        return values.astype(np.float32)
    applied = np.asarray(activation(tf.constant(values[None, :], tf.float32)), np.float32)
    return np.array(applied[0], np.float32)
