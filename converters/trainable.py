"""Export a tf_keras classifier as a LiteRT *training* artifact that runs with builtin ops only.

Devices train without TensorFlow, and ai-edge-litert cannot run Select TF (Flex) ops from Python.
So the model is re-implemented with plain TF ops whose gradients are TFLite builtins: relu, tanh
and sigmoid carry hand-written gradients (no ``ReluGrad``/``TanhGrad``), convolutions and pooling
are built from ``tf.pad``/``tf.slice`` views of the input (no ``Conv2DBackpropFilter``, no
``StridedSliceGrad``), the batch size is fixed (no ``BroadcastGradientArgs``) and checkpoints are
replaced by ``get_weights``/``set_weights`` signatures (no ``Save``/``Restore``).

Any model whose layers form one chain from a single input to a single output is accepted, whatever
API built it (Sequential, Functional, a clone, TF-MOT's stripped copy, a loaded file); nested
models are flattened into the chain. The chain is read from the model's own graph (``_chain``),
and a branch, a merge, a layer used twice or a second input or output is refused with one line
naming it.

BatchNormalization is trained, not folded. Folding it into the preceding kernel would give the
artifact another weight layout than ``model.get_weights()``, which the coordinator and the keras
trainer exchange, and would freeze what training changes. In ``train`` it uses the batch
statistics and updates the moving ones as tf_keras does; its mean, variance and their gradients
at a fixed batch size are builtins, and one step matches tf_keras's to float rounding. ``infer``
uses the moving statistics. Only renorm, virtual batches, adjustments, synchronized statistics
and axes other than the last are refused.

Signatures, for B = ``batch_size``, S = the input shape, K = classes, N = ``len(get_weights())``:

    train(x: float32[B, *S], y: int64[B])      -> {"loss": float32[]}
    infer(x: float32[B, *S])                   -> {"probs": float32[B, K]}
    get_weights()                              -> {"w000": float32[...], ..., "w<N-1>": ...}
    set_weights(w000=float32[...], ...)        -> {"ok": int32[]}  (always 1)
    set_masks(m000=float32[...], ...)          -> {"ok": int32[]}  (always 1)

``train`` is one optimizer step as tf_keras takes it (mean sparse categorical cross-entropy on the
final softmax's logits, then the tf_keras SGD-with-momentum or Adam update), after which every
trainable weight is multiplied by its mask (1 = kept); the returned loss is the one before the
step. The weights are ``model.get_weights()`` in order, non-trainable ones included (a
BatchNormalization's moving mean and variance, which ``train`` updates and no optimizer touches).
``set_weights`` also zeroes the optimizer state: each round starts with a fresh optimizer, like
the keras trainer. Masks start as ones; ``set_masks`` takes one per weight (ones for biases and
for weights that are not pruned).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from fedprune.converters._errors import short_reason
from fedprune.converters.tflite import sample_shape
from fedprune.edge_client.litert import Runtime, load_interpreter
from fedprune.edge_client.litert_trainer import SIGNATURES
from fedprune.protocol.errors import ConfigError, ExportError, ModelError

_Fn = Callable[[tf.Tensor], tf.Tensor]


# --- activations: forward op with a gradient made of builtin ops --------------------------------


def _relu_and_grad(x: tf.Tensor) -> tuple[tf.Tensor, _Fn]:
    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * tf.cast(x > 0, dy.dtype)

    return tf.nn.relu(x), grad


def _tanh_and_grad(x: tf.Tensor) -> tuple[tf.Tensor, _Fn]:
    y = tf.tanh(x)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * (1 - y * y)

    return y, grad


def _sigmoid_and_grad(x: tf.Tensor) -> tuple[tf.Tensor, _Fn]:
    y = tf.sigmoid(x)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * y * (1 - y)

    return y, grad


def _linear(x: tf.Tensor) -> tf.Tensor:
    return x


_ACTIVATIONS: dict[str, _Fn] = {
    "linear": _linear,
    "relu": tf.custom_gradient(_relu_and_grad),
    "tanh": tf.custom_gradient(_tanh_and_grad),
    "sigmoid": tf.custom_gradient(_sigmoid_and_grad),
    "softmax": tf.nn.softmax,
}


# --- layers: each becomes an affine/shape part followed by a named activation -------------------


@dataclass(frozen=True)
class _Step:
    """One layer as plain TF: ``activation(body(x))``. The softmax of the last step is left to the
    loss, which takes its input as logits. ``train_body`` replaces ``body`` in ``train`` for the
    layers that behave differently in training (BatchNormalization: batch statistics)."""

    body: _Fn
    activation: str
    train_body: _Fn | None = None

    def run(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
        """The step without its activation, as ``train`` (``training``) or ``infer`` runs it."""
        body = self.train_body if training and self.train_body is not None else self.body
        return body(x)


class _Unsupported(Exception):
    """Raised by a layer builder for a configuration it cannot express; carries the detail."""


_Builder = Callable[[Any, list[tf.Variable]], _Step]


def _activation_name(layer: Any, fn: Any) -> str:
    name = str(getattr(fn, "__name__", ""))
    if name not in _ACTIVATIONS or tf_keras.activations.get(name) is not fn:
        raise _Unsupported(f"activation {name or fn!r}")
    return name


def _require(layer: Any, **expected: Any) -> None:
    for attr, value in expected.items():
        actual = getattr(layer, attr)
        if actual != value:
            raise _Unsupported(f"{attr}={actual!r}")


def _dense(layer: Any, variables: list[tf.Variable]) -> _Step:
    if len(layer.input_shape) != 2:
        raise _Unsupported(f"input of rank {len(layer.input_shape)}")
    kernel, *bias = variables

    def body(x: tf.Tensor) -> tf.Tensor:
        y = tf.matmul(x, kernel)
        return y + bias[0] if bias else y

    return _Step(body, _activation_name(layer, layer.activation))


def _taps(
    x: tf.Tensor,
    size: tuple[int, int],
    strides: tuple[int, int],
    padding: str,
    pad_value: float = 0.0,
) -> list[tf.Tensor]:
    """What each kernel tap sees: ``kh * kw`` tensors shaped [B, out_h, out_w, C], row-major.

    Built from ``tf.pad``, ``tf.slice`` and reshapes only, so the gradient is Pad and Slice:
    strided slicing would need ``StridedSliceGrad`` (Flex). A stride is taken by reshaping a
    contiguous slice to (out, stride) and keeping index 0.
    """
    b, h, w, c = (int(d) for d in x.shape)
    rows = _axis(h, size[0], strides[0], padding)
    cols = _axis(w, size[1], strides[1], padding)
    paddings = [[0, 0], [rows[1], rows[2]], [cols[1], cols[2]], [0, 0]]
    if any(any(p) for p in paddings):
        x = tf.pad(x, paddings, constant_values=pad_value)
    (oh, sh), (ow, sw) = (rows[0], strides[0]), (cols[0], strides[1])
    taps = []
    for i in range(size[0]):
        for j in range(size[1]):
            tap = tf.slice(x, [0, i, j, 0], [b, oh * sh, ow * sw, c])
            if sh > 1:
                tap = tf.reshape(tap, [b * oh, sh, ow * sw * c])
                tap = tf.slice(tap, [0, 0, 0], [b * oh, 1, ow * sw * c])
            if sw > 1:
                tap = tf.reshape(tap, [b * oh * ow, sw, c])
                tap = tf.slice(tap, [0, 0, 0], [b * oh * ow, 1, c])
            taps.append(tf.reshape(tap, [b, oh, ow, c]))
    return taps


def _axis(n: int, k: int, s: int, padding: str) -> tuple[int, int, int]:
    """(output length, padding before, padding after) along one axis, TensorFlow's rules, plus
    enough trailing padding that every tap's slice of ``out * s`` entries fits."""
    if padding == "same":
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        before = total // 2
    else:
        out = (n - k) // s + 1
        before = 0
    after = max((k - 1) + out * s - (n + before), 0)
    return out, before, after


def _window(layer: Any) -> tuple[tuple[int, int], tuple[int, int], str]:
    _require(layer, data_format="channels_last")
    if layer.padding not in ("same", "valid"):
        raise _Unsupported(f"padding={layer.padding!r}")
    kh, kw = getattr(layer, "kernel_size", None) or layer.pool_size
    sh, sw = layer.strides
    return (int(kh), int(kw)), (int(sh), int(sw)), str(layer.padding)


def _conv2d(layer: Any, variables: list[tf.Variable]) -> _Step:
    _require(layer, dilation_rate=(1, 1), groups=1)
    size, strides, padding = _window(layer)
    kernel, *bias = variables
    kh, kw, cin, cout = (int(d) for d in kernel.shape)

    def body(x: tf.Tensor) -> tf.Tensor:
        taps = _taps(x, size, strides, padding)
        b, oh, ow, _ = (int(d) for d in taps[0].shape)
        patches = tf.concat([tf.reshape(t, [b * oh * ow, cin]) for t in taps], axis=1)
        y = tf.matmul(patches, tf.reshape(kernel, [kh * kw * cin, cout]))
        y = tf.reshape(y, [b, oh, ow, cout])
        return y + bias[0] if bias else y

    return _Step(body, _activation_name(layer, layer.activation))


def _max_pool(layer: Any, variables: list[tf.Variable]) -> _Step:
    size, strides, padding = _window(layer)

    def body(x: tf.Tensor) -> tf.Tensor:
        taps = _taps(x, size, strides, padding, pad_value=float(np.finfo(np.float32).min))
        y = taps[0]
        for tap in taps[1:]:
            y = tf.maximum(y, tap)
        return y

    return _Step(body, "linear")


def _average_pool(layer: Any, variables: list[tf.Variable]) -> _Step:
    size, strides, padding = _window(layer)

    def body(x: tf.Tensor) -> tf.Tensor:
        # Like TensorFlow, 'same' windows average over the entries inside the input only.
        ones = tf.ones([1, *x.shape[1:3], 1])
        counts = tf.add_n(_taps(ones, size, strides, padding))
        return tf.add_n(_taps(x, size, strides, padding)) / counts

    return _Step(body, "linear")


def _flatten(layer: Any, variables: list[tf.Variable]) -> _Step:
    _require(layer, data_format="channels_last")
    return _Step(lambda x: tf.reshape(x, [x.shape[0], -1]), "linear")


def _reshape(layer: Any, variables: list[tf.Variable]) -> _Step:
    target = [int(d) for d in layer.output_shape[1:]]
    return _Step(lambda x: tf.reshape(x, [x.shape[0], *target]), "linear")


def _relu_layer(layer: Any, variables: list[tf.Variable]) -> _Step:
    if layer.max_value is not None or float(layer.negative_slope) or float(layer.threshold):
        raise _Unsupported("max_value, negative_slope or threshold set")
    return _Step(_linear, "relu")


def _activation(layer: Any, variables: list[tf.Variable]) -> _Step:
    return _Step(_linear, _activation_name(layer, layer.activation))


def _softmax(layer: Any, variables: list[tf.Variable]) -> _Step:
    if layer.axis not in (-1, [-1]):
        raise _Unsupported(f"axis={layer.axis!r}")
    return _Step(_linear, "softmax")


def _identity(layer: Any, variables: list[tf.Variable]) -> _Step:
    return _Step(_linear, "linear")


def _batch_norm(layer: Any, variables: list[tf.Variable]) -> _Step:
    """tf_keras BatchNormalization over the last axis, in both modes.

    Inference (and a layer with ``trainable=False``, which tf_keras always runs in inference
    mode) normalizes with the moving statistics. Training normalizes with the batch's mean and
    biased variance, as ``tf.nn.moments`` computes them, and moves the moving statistics toward
    them by tf_keras's rule ``v -= (v - batch) * (1 - momentum)``. Mean, square, rsqrt and their
    gradients at a fixed batch size convert to builtins (MEAN, SQUARED_DIFFERENCE, RSQRT, TILE).
    """
    _require(layer, renorm=False, virtual_batch_size=None, adjustment=None, synchronized=False)
    rank = len(layer.input_shape)
    if list(layer.axis) != [rank - 1]:
        raise _Unsupported(f"axis={list(layer.axis)!r}")
    by_id = {id(w): v for w, v in zip(layer.weights, variables, strict=True)}
    gamma = by_id[id(layer.gamma)] if layer.scale else None
    beta = by_id[id(layer.beta)] if layer.center else None
    moving_mean, moving_var = by_id[id(layer.moving_mean)], by_id[id(layer.moving_variance)]
    epsilon, decay = float(layer.epsilon), 1.0 - float(layer.momentum)
    axes = list(range(rank - 1))

    def normalize(x: tf.Tensor, mean: tf.Tensor, variance: tf.Tensor) -> tf.Tensor:
        # tf.nn.batch_normalization's expression: x * inv + (beta - mean * inv).
        inv = tf.math.rsqrt(variance + epsilon)
        inv = inv * gamma if gamma is not None else inv
        return x * inv + (beta - mean * inv if beta is not None else -mean * inv)

    def infer(x: tf.Tensor) -> tf.Tensor:
        return normalize(x, moving_mean, moving_var)

    def train(x: tf.Tensor) -> tf.Tensor:
        mean = tf.reduce_mean(x, axes)
        variance = tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes)
        moving_mean.assign_sub((moving_mean - mean) * decay)
        moving_var.assign_sub((moving_var - variance) * decay)
        return normalize(x, mean, variance)

    return _Step(infer, "linear", train if layer.trainable else None)


_LAYERS: dict[type, _Builder] = {
    tf_keras.layers.Dense: _dense,
    tf_keras.layers.Conv2D: _conv2d,
    tf_keras.layers.MaxPooling2D: _max_pool,
    tf_keras.layers.AveragePooling2D: _average_pool,
    tf_keras.layers.Flatten: _flatten,
    tf_keras.layers.Reshape: _reshape,
    tf_keras.layers.ReLU: _relu_layer,
    tf_keras.layers.Activation: _activation,
    tf_keras.layers.Softmax: _softmax,
    tf_keras.layers.Dropout: _identity,  # dropout is off in on-device training
    tf_keras.layers.BatchNormalization: _batch_norm,
}


# --- optimizers: the tf_keras update rules, with state that set_weights zeroes ------------------


class _Sgd(tf.Module):  # type: ignore[misc]
    """tf_keras SGD: ``m = -g * lr + m * momentum; w += m`` (no buffer when momentum is 0)."""

    def __init__(self, variables: Sequence[tf.Variable], *, lr: float, momentum: float) -> None:
        super().__init__()
        self.lr, self.momentum = tf.constant(lr, tf.float32), tf.constant(momentum, tf.float32)
        self.slots = [_zeros_like(v) for v in variables] if momentum else []

    def apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable]) -> None:
        if not self.slots:
            for g, w in zip(grads, variables, strict=True):
                w.assign_add(-g * self.lr)
            return
        for g, w, m in zip(grads, variables, self.slots, strict=True):
            m.assign(-g * self.lr + m * self.momentum)
            w.assign_add(m)


class _Adam(tf.Module):  # type: ignore[misc]
    """tf_keras Adam with its defaults (beta_1 0.9, beta_2 0.999, epsilon 1e-7)."""

    BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7

    def __init__(self, variables: Sequence[tf.Variable], *, lr: float, momentum: float) -> None:
        super().__init__()
        self.lr = tf.constant(lr, tf.float32)
        self.step = tf.Variable(0.0, trainable=False, name="step")
        self.m = [_zeros_like(v) for v in variables]
        self.v = [_zeros_like(v) for v in variables]
        self.slots = [self.step, *self.m, *self.v]

    def apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable]) -> None:
        # Same expressions and float32 roundings as tf_keras: (1 - beta) is a Python float there.
        t = self.step + 1
        b1_power, b2_power = tf.pow(self.BETA_1, t), tf.pow(self.BETA_2, t)
        alpha = self.lr * tf.sqrt(1 - b2_power) / (1 - b1_power)
        for g, w, m, v in zip(grads, variables, self.m, self.v, strict=True):
            m.assign_add((g - m) * (1 - self.BETA_1))
            v.assign_add((tf.square(g) - v) * (1 - self.BETA_2))
            w.assign_sub((m * alpha) / (tf.sqrt(v) + self.EPSILON))
        self.step.assign_add(1.0)


_OPTIMIZERS: dict[str, type[_Sgd] | type[_Adam]] = {"sgd": _Sgd, "adam": _Adam}


def _zeros_like(v: tf.Variable) -> tf.Variable:
    return tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False)


# --- the module the artifact is converted from --------------------------------------------------


class _Trainable(tf.Module):  # type: ignore[misc]
    """The variables (weights, masks, optimizer state) and the signatures' tf.functions."""

    def __init__(
        self,
        steps: list[_Step],
        weights: list[tf.Variable],
        trainable: list[bool],
        optimizer: type[_Sgd] | type[_Adam],
        hyper: dict[str, float],
        x_spec: tf.TensorSpec,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.weights = weights
        self.masks = [tf.Variable(tf.ones(w.shape), trainable=False) for w in weights]
        self.trained = [i for i, flag in enumerate(trainable) if flag]
        self.optimizer = optimizer([weights[i] for i in self.trained], **hyper)
        batch = int(x_spec.shape[0])
        y_spec = tf.TensorSpec([batch], tf.int64, name="y")
        w_specs = [
            tf.TensorSpec(w.shape, tf.float32, name=f"w{i:03d}") for i, w in enumerate(weights)
        ]
        m_specs = [
            tf.TensorSpec(w.shape, tf.float32, name=f"m{i:03d}") for i, w in enumerate(weights)
        ]
        self.train = tf.function(self._train, input_signature=[x_spec, y_spec])
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(self._set_weights, input_signature=w_specs)
        self.set_masks = tf.function(self._set_masks, input_signature=m_specs)

    def _logits(self, x: tf.Tensor, *, training: bool) -> tf.Tensor:
        for step in self.steps[:-1]:
            x = _ACTIVATIONS[step.activation](step.run(x, training=training))
        return self.steps[-1].run(x, training=training)

    def _train(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        variables = [self.weights[i] for i in self.trained]
        with tf.GradientTape() as tape:
            logits = self._logits(x, training=True)
            picked = tf.nn.log_softmax(logits) * tf.one_hot(y, int(logits.shape[-1]))
            loss = -tf.reduce_mean(tf.reduce_sum(picked, axis=-1))
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        for i in self.trained:
            self.weights[i].assign(self.weights[i] * self.masks[i])
        return {"loss": loss}

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probs": tf.nn.softmax(self._logits(x, training=False))}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {f"w{i:03d}": w.read_value() for i, w in enumerate(self.weights)}

    def _set_weights(self, *values: tf.Tensor) -> dict[str, tf.Tensor]:
        for w, value in zip(self.weights, values, strict=True):
            w.assign(value)
        for slot in self.optimizer.slots:
            slot.assign(tf.zeros_like(slot))
        return {"ok": tf.constant(1)}

    def _set_masks(self, *values: tf.Tensor) -> dict[str, tf.Tensor]:
        for m, value in zip(self.masks, values, strict=True):
            m.assign(value)
        return {"ok": tf.constant(1)}


# --- building and converting ---------------------------------------------------------------------


def build_trainable(
    model: tf_keras.Model,
    *,
    batch_size: int,
    optimizer: str = "sgd",
    learning_rate: float,
    momentum: float = 0.0,
) -> bytes:
    """The LiteRT training artifact (see the module docstring) for a stripped tf_keras classifier.

    The model must be a chain of supported layers (``_LAYERS``) ending in a softmax. Dropout is
    off in on-device training (it is the identity). The artifact's variables start at the model's
    weights, masks at ones and optimizer state at zero. ``momentum`` is ignored by Adam.

    Raises:
        ConfigError: an unknown optimizer or a hyperparameter out of range.
        ExportError: an unsupported layer or model shape, or the conversion fails.
    """
    hyper = _hyper(optimizer, batch_size, learning_rate, momentum)
    layers = _chain(model)
    weights = [tf.Variable(np.asarray(w, np.float32)) for w in model.get_weights()]
    index = {id(v): i for i, v in enumerate(model.weights)}
    if len(index) != len(weights):
        raise ExportError(f"model {model.name!r}: weights and get_weights() do not match")
    steps = []
    for layer in layers:
        if type(layer).__name__ == "PruneLowMagnitude":  # checked by name: no TF-MOT import here
            raise ExportError(
                f"layer {layer.name!r} is a pruning wrapper; strip the model first"
                " (converters.strip.strip)"
            )
        builder = _LAYERS.get(type(layer))
        try:
            if builder is None:
                raise _Unsupported("")
            steps.append(builder(layer, [weights[index[id(v)]] for v in layer.weights]))
        except _Unsupported as exc:
            raise _unsupported(layer, str(exc)) from None
    if not steps or steps[-1].activation != "softmax":
        raise ExportError(
            f"model {model.name!r} does not end in a softmax; the litert trainer needs one"
            ' (or use the keras trainer: trainer = "keras" in the device profile)'
        )
    trainable = [False] * len(weights)
    for v in model.trainable_weights:
        trainable[index[id(v)]] = True
    x_spec = tf.TensorSpec([batch_size, *sample_shape(model)], tf.float32, name="x")
    module = _Trainable(steps, weights, trainable, _OPTIMIZERS[optimizer], hyper, x_spec)
    content = _convert(module)
    _verify(content)
    return content


def _hyper(optimizer: str, batch_size: int, lr: float, momentum: float) -> dict[str, float]:
    checks = [
        ("optimizer", optimizer in _OPTIMIZERS, f"one of {', '.join(_OPTIMIZERS)}", optimizer),
        ("batch_size", isinstance(batch_size, int) and batch_size >= 1, ">= 1", batch_size),
        ("learning_rate", math.isfinite(lr) and lr > 0, "> 0", lr),
        ("momentum", 0.0 <= momentum < 1.0, "in [0, 1)", momentum),
    ]
    for name, ok, rule, value in checks:
        if not ok:
            raise ConfigError(f"trainable export: {name} must be {rule}, got {value!r}")
    return {"lr": float(lr), "momentum": float(momentum)}


def _chain(model: tf_keras.Model) -> list[Any]:
    """The model's layers from input to output, nested models flattened, or an ExportError naming
    what keeps them from being a single chain (a merge, a layer used twice, several inputs or
    outputs, a subclassed model).

    Whatever API built the model, the walk follows the model's own graph: back from its output,
    ``KerasTensor.node`` is the call of a layer that made the tensor *in this model*. A layer's
    ``input``/``output`` do not do: TF-MOT's ``strip_pruning`` calls the wrapped model's inner
    layers again in a new graph, so each layer has one node per model, and its ``input`` and
    ``output`` are those of the first (the copy the pruner wrapped), not of the stripped model.
    """
    if getattr(model, "_is_graph_network", False):
        layers = _walk(model)
    elif isinstance(model, tf_keras.Sequential):
        layers = list(model.layers)  # not built on a known input: a chain by construction
    else:
        raise _not_a_chain(model, "it is a subclassed model, not a graph of layers")
    flat = [inner for layer in layers for inner in _unnest(layer)]
    seen: set[int] = set()
    for layer in flat:
        if id(layer) in seen:
            raise _not_a_chain(model, f"{_named(layer)} is used more than once")
        seen.add(id(layer))
    return flat


def _walk(model: tf_keras.Model) -> list[Any]:
    """The layers of a graph model, from the node after its InputLayer to its single output."""
    for what, tensors in (("inputs", model.inputs), ("outputs", model.outputs)):
        if len(tensors) != 1:
            names = ", ".join(repr(t.node.layer.name) for t in tensors)
            raise _not_a_chain(model, f"it has {len(tensors)} {what} ({names})")
    layers = []
    node = model.outputs[0].node
    while not node.is_input:
        if len(node.keras_inputs) != 1:
            reason = f"{_named(node.layer)} takes {len(node.keras_inputs)} inputs"
            raise _not_a_chain(model, reason)
        layers.append(node.layer)
        node = node.keras_inputs[0].node
    return layers[::-1]


def _unnest(layer: Any) -> list[Any]:
    """A nested model's chain in its place; any other layer as it is."""
    return _chain(layer) if isinstance(layer, tf_keras.Model) else [layer]


def _named(layer: Any) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


def _not_a_chain(model: tf_keras.Model, reason: str) -> ExportError:
    return ExportError(
        f"model {model.name!r} is not a single chain of layers: {reason}; the litert trainer"
        ' needs one (or use the keras trainer: trainer = "keras" in the device profile)'
    )


def _unsupported(layer: Any, detail: str) -> ExportError:
    kind = type(layer).__name__ + (f", {detail}" if detail else "")
    return ExportError(
        f"layer {layer.name!r} ({kind}) is not supported by the litert trainer;"
        ' use the keras trainer (trainer = "keras" in the device profile)'
    )


def _convert(module: _Trainable) -> bytes:
    """Trace the signatures, save them as a SavedModel and convert that with builtin ops only."""
    folder = Path(tempfile.mkdtemp(prefix="fedprune-trainable-"))
    try:
        signatures = {key: getattr(module, key).get_concrete_function() for key in SIGNATURES}
        tf.saved_model.save(module, str(folder), signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            str(folder), signature_keys=list(SIGNATURES)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return bytes(converter.convert())
    except Exception as exc:  # tracing, saving and converting raise many types
        raise ExportError(f"trainable TFLite conversion failed: {short_reason(exc)}") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _verify(content: bytes) -> None:
    """Run every signature once on zeros in LiteRT's default interpreter, the one the litert
    trainer uses: an op the device cannot run fails here, at export, and not when the first round
    starts on a device."""
    try:
        interpreter = load_interpreter(content, runtime=Runtime.DEFAULT)
        for key in SIGNATURES:
            runner = interpreter.get_signature_runner(key)
            details = runner.get_input_details().items()
            runner(**{name: np.zeros(d["shape"], d["dtype"]) for name, d in details})
    except (ModelError, ValueError, RuntimeError) as exc:
        raise ExportError(
            f"the trainable artifact does not run in LiteRT: {short_reason(exc)}"
        ) from exc
