"""A tf_keras model's layer calls, read from its own graph: what the training artifact and unit
pruning walk.

Whatever API built the model (Sequential, Functional, a clone, TF-MOT's stripped copy, a loaded
file), the walk follows the model's own nodes: back from its output, ``KerasTensor.node`` is the
call of a layer that made the tensor *in this model*. A layer's ``input``/``output`` do not do:
TF-MOT's ``strip_pruning`` calls the wrapped model's inner layers again in a new graph, so each
layer has one node per model, and its ``input`` and ``output`` are those of the first (the copy
the pruner wrapped), not of the stripped model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf
import tf_keras

Call = tuple[Any, tuple[int, ...]]
"""A layer call of the graph: the layer and the calls whose outputs it takes (-1: the input)."""

Refusal = Callable[[Any, str], Exception]
"""Makes the error for a model the caller cannot take, from the model and the reason."""


def calls(model: tf_keras.Model, refused: Refusal) -> list[Call]:
    """The model's layer calls, each after those it takes from and the output's last, nested
    models inlined; or ``refused(model, reason)`` raised for what a graph of single-output layer
    calls from one input to one output cannot express (a layer used twice, several inputs or
    outputs, a subclassed model)."""
    found: list[Call] = []
    _inline(model, -1, found, refused)
    seen: set[int] = set()
    for layer, _ in found:
        if id(layer) in seen:
            raise refused(model, f"{named(layer)} is used more than once")
        seen.add(id(layer))
    return found


def named(layer: Any) -> str:
    """``layer 'name' (Type)``: how errors name a layer."""
    return f"layer {layer.name!r} ({type(layer).__name__})"


def _inline(model: tf_keras.Model, source: int, found: list[Call], refused: Refusal) -> int:
    """Append ``model``'s calls, its input being call ``source``'s output; its output's call."""
    if isinstance(model, tf_keras.Sequential) and not getattr(model, "_is_graph_network", False):
        for layer in model.layers:  # not built on a known input: a chain by construction
            source = _call(layer, (source,), found, refused)
        return source
    if not getattr(model, "_is_graph_network", False):
        raise refused(model, "it is a subclassed model, not a graph of layers")
    for what, tensors in (("inputs", model.inputs), ("outputs", model.outputs)):
        if len(tensors) != 1:
            names = ", ".join(repr(t.node.layer.name) for t in tensors)
            raise refused(model, f"it has {len(tensors)} {what} ({names})")
    done: dict[int, int] = {}  # id(node) -> the call that made its output

    def visit(node: Any) -> int:
        if node.is_input:
            return source
        if id(node) not in done:
            if len(tf.nest.flatten(node.outputs)) != 1:
                raise refused(model, f"{named(node.layer)} has several outputs")
            inputs = tuple(visit(tensor.node) for tensor in node.keras_inputs)
            done[id(node)] = _call(node.layer, inputs, found, refused)
        return done[id(node)]

    return visit(model.outputs[0].node)


def _call(layer: Any, inputs: tuple[int, ...], found: list[Call], refused: Refusal) -> int:
    """Append a call of ``layer`` (a nested model: its calls); the index of its output."""
    if isinstance(layer, tf_keras.Model):
        if len(inputs) != 1:
            raise refused(layer, f"it takes {len(inputs)} inputs")
        return _inline(layer, inputs[0], found, refused)
    found.append((layer, inputs))
    return len(found) - 1
