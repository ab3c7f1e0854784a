"""Export a tf_keras classifier as a LiteRT *training* artifact that runs with builtin ops only.

Devices train without TensorFlow, and ai-edge-litert cannot run Select TF (Flex) ops from Python.
So the model is re-implemented with plain TF ops whose gradients are TFLite builtins: relu, tanh
and sigmoid carry hand-written gradients (no ``ReluGrad``/``TanhGrad``), convolutions and pooling
are built from ``tf.pad``/``tf.slice`` views of the input (no ``Conv2DBackpropFilter``, no
``StridedSliceGrad``), the batch size is fixed (no ``BroadcastGradientArgs``) and checkpoints are
replaced by ``get_weights``/``set_weights`` signatures (no ``Save``/``Restore``).

Any model whose layers form a graph from a single input to a single output is accepted, whatever
API built it (Sequential, Functional, a clone, TF-MOT's stripped copy, a loaded file): branches
(a tensor several layers take), merges (``Add``, ``Concatenate``, ``Multiply``: residual and
squeeze-and-excite blocks) and nested models, inlined where they are called (converters/graph.py
reads the graph). A layer used twice or a second input or output is refused with one line naming
it.

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
    (reconstruct: train(x, y: float32[B, *O]), infer(x) -> {"output": float32[B, *O]})
    get_weights()                              -> {"w000": float32[...], ..., "w<N-1>": ...}
    set_weights(w000=float32[...], ...)        -> {"ok": int32[]}  (always 1)
    set_masks(m000=float32[...], ...)          -> {"ok": int32[]}  (always 1)
    set_lr(lr: float32[1])                     -> {"ok": int32[]}  (always 1)
    moments(x: float32[B, *S])                 -> {"w<i>": float32[C], ...}  (with BN only)
    set_correction(c000=float32[...], ...)     -> {"ok": int32[]}  (with scaffold only)
    get_gradient()                             -> {"g000": float32[...], ...}  (with scaffold)

``train`` is one optimizer step as tf_keras takes it (mean sparse categorical cross-entropy on the
final softmax's logits; for a reconstruction, with O the output shape, the mean squared error of
the output against ``y``, the input itself: edge_client/task.py), then the tf_keras
SGD-with-momentum or Adam update), after which every
trainable weight is multiplied by its mask (1 = kept); the returned loss is the one before the
step. The weights are ``model.get_weights()`` in order, non-trainable ones included (a
BatchNormalization's moving mean and variance, which ``train`` updates and no optimizer touches).
``set_weights`` also zeroes the optimizer state: each round starts with a fresh optimizer, like
the keras trainer. ``set_lr`` sets the learning rate of the steps that follow (a round's, from the
coordinator's schedule; it starts at ``learning_rate``), until it is set again. With ``prox_mu``
(FedProx), ``set_weights`` also keeps a copy of the trainable weights, the round's anchor, and
``train`` minimizes the loss plus ``prox_mu / 2 * sum ||w - anchor||^2`` over the trainable weights
(not the moving statistics); the loss it returns is still the data loss alone, comparable with
and without the term. Masks start as ones; ``set_masks`` takes one per weight (ones for biases
and for weights that are not pruned). A model with BatchNormalization also has ``moments``: the
batch statistics each layer's moving mean and variance follow in ``train`` (named by their weight
index), which a device averages over its data at the end of a round (edge_client/trainer.py,
``calibrated``). With ``scaffold`` (SCAFFOLD), ``train`` adds the correction ``c - c_i`` that
``set_correction`` set (one array per weight, like ``set_masks``; those of weights no optimizer
trains are ignored; zeros at first) to each step's gradient, and sums the raw gradients (before
the correction) and counts its steps, which ``set_weights`` resets; ``get_gradient`` gives their
mean per weight (zeros for the weights no optimizer trains, and before any step), the device's
new control variate. Without it the artifact has none of these variables.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from fedprune.converters import graph
from fedprune.converters._errors import short_reason
from fedprune.converters.tflite import sample_shape
from fedprune.converters.training_layers import ACTIVATIONS, LAYERS, Step, Unsupported
from fedprune.edge_client.keras_trainer import proximal
from fedprune.edge_client.litert import Runtime, load_interpreter
from fedprune.edge_client.litert_trainer import (
    MOMENTS,
    SCAFFOLD_SIGNATURES,
    SET_LR,
    SIGNATURES,
)
from fedprune.edge_client.task import Task
from fedprune.protocol.errors import ConfigError, ExportError, ModelError

_Fn = Callable[[tf.Tensor], tf.Tensor]


# --- optimizers: the tf_keras update rules, with state that set_weights zeroes ------------------


class _Optimizer(tf.Module):  # type: ignore[misc]
    """What every update rule has: its learning rate, a float32 variable as tf_keras's is (which
    ``set_lr`` assigns), and its state, ``slots`` (which ``set_weights`` zeroes). Each rule
    overrides ``apply``."""

    def __init__(self, variables: Sequence[tf.Variable], *, lr: float, momentum: float) -> None:
        super().__init__()
        self.lr = tf.Variable(lr, dtype=tf.float32, trainable=False, name="lr")
        self.slots: list[tf.Variable] = []

    def apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable]) -> None:
        raise NotImplementedError


class _Sgd(_Optimizer):
    """tf_keras SGD: ``m = -g * lr + m * momentum; w += m`` (no buffer when momentum is 0)."""

    def __init__(self, variables: Sequence[tf.Variable], *, lr: float, momentum: float) -> None:
        super().__init__(variables, lr=lr, momentum=momentum)
        self.momentum = tf.constant(momentum, tf.float32)
        self.slots = [_zeros_like(v) for v in variables] if momentum else []

    def apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable]) -> None:
        if not self.slots:
            for g, w in zip(grads, variables, strict=True):
                w.assign_add(-g * self.lr)
            return
        for g, w, m in zip(grads, variables, self.slots, strict=True):
            m.assign(-g * self.lr + m * self.momentum)
            w.assign_add(m)


class _Adam(_Optimizer):
    """tf_keras Adam with its defaults (beta_1 0.9, beta_2 0.999, epsilon 1e-7)."""

    BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7

    def __init__(self, variables: Sequence[tf.Variable], *, lr: float, momentum: float) -> None:
        super().__init__(variables, lr=lr, momentum=momentum)
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


_OPTIMIZERS: dict[str, type[_Optimizer]] = {"sgd": _Sgd, "adam": _Adam}


def _zeros_like(v: tf.Variable) -> tf.Variable:
    return tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False)


# --- the module the artifact is converted from --------------------------------------------------


class _Trainable(tf.Module):  # type: ignore[misc]
    """The variables (weights, masks, optimizer state) and the signatures' tf.functions."""

    def __init__(
        self,
        steps: list[Step],
        sources: list[tuple[int, ...]],
        weights: list[tf.Variable],
        trainable: list[bool],
        optimizer: type[_Optimizer],
        hyper: dict[str, float],
        x_spec: tf.TensorSpec,
        output: Sequence[int] | None,
        prox_mu: float = 0.0,
        scaffold: bool = False,
    ) -> None:
        """``output``: the shape a reconstruction learns (``None``: a classifier); ``prox_mu``:
        FedProx's weight (0: no anchors, no term); ``scaffold``: SCAFFOLD's correction and
        gradient sums (module docstring)."""
        super().__init__()
        self.output = output
        self.steps, self.sources = steps, sources
        self.weights = weights
        self.masks = [tf.Variable(tf.ones(w.shape), trainable=False) for w in weights]
        self.trained = [i for i, flag in enumerate(trainable) if flag]
        self.optimizer = optimizer([weights[i] for i in self.trained], **hyper)
        self.prox_mu = tf.constant(prox_mu, tf.float32)
        self.anchors = [_zeros_like(weights[i]) for i in self.trained] if prox_mu else []
        self.scaffold = scaffold
        if scaffold:
            self.corrections = [_zeros_like(weights[i]) for i in self.trained]
            self.sums = [_zeros_like(weights[i]) for i in self.trained]
            self.count = tf.Variable(0.0, trainable=False, name="steps")
        batch = int(x_spec.shape[0])
        y_spec = (
            tf.TensorSpec([batch], tf.int64, name="y")
            if output is None
            else tf.TensorSpec([batch, *output], tf.float32, name="y")
        )
        w_specs = [
            tf.TensorSpec(w.shape, tf.float32, name=f"w{i:03d}") for i, w in enumerate(weights)
        ]
        m_specs, c_specs = (
            [tf.TensorSpec(w.shape, tf.float32, name=f"{p}{i:03d}") for i, w in enumerate(weights)]
            for p in "mc"
        )
        self.train = tf.function(self._train, input_signature=[x_spec, y_spec])
        self.infer = tf.function(self._infer, input_signature=[x_spec])
        position = {id(w): i for i, w in enumerate(weights)}
        self.followed = {  # step -> where its moving mean and variance are in the weights
            i: tuple(position[id(v)] for v in step.moving)
            for i, step in enumerate(steps)
            if step.moving is not None and step.moments is not None
        }
        if self.followed:
            self.moments = tf.function(self._moments, input_signature=[x_spec])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(self._set_weights, input_signature=w_specs)
        self.set_masks = tf.function(self._set_masks, input_signature=m_specs)
        self.set_lr = tf.function(
            # rank 1, not a scalar: LiteRT for aarch64 crashed (SIGSEGV, under qemu) on a rank-0
            # signature input (tests/integration/test_arm64.py)
            self._set_lr,
            input_signature=[tf.TensorSpec([1], tf.float32, name="lr")],
        )
        if scaffold:
            self.set_correction = tf.function(self._set_correction, input_signature=c_specs)
            self.get_gradient = tf.function(self._get_gradient, input_signature=[])

    def _logits(
        self, x: tf.Tensor, *, training: bool, found: dict[str, tf.Tensor] | None = None
    ) -> tf.Tensor:
        """Every call in order, each on the outputs it takes (-1: the input); the last one's
        softmax is left to the loss. ``found`` collects, by weight name, the statistics each
        BatchNormalization's moving mean and variance follow."""
        outputs: list[tf.Tensor] = []
        for i, (step, sources) in enumerate(zip(self.steps, self.sources, strict=True)):
            inputs = [x if j < 0 else outputs[j] for j in sources]
            if found is not None and i in self.followed and step.moments is not None:
                for at, value in zip(self.followed[i], step.moments(inputs[0]), strict=True):
                    found[f"w{at:03d}"] = value
            y = step.run(inputs, training=training)
            outputs.append(y if i == len(self.steps) - 1 else ACTIVATIONS[step.activation](y))
        return outputs[-1]

    def _moments(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        """The batch statistics each BatchNormalization's moving mean and variance follow, by
        weight name, from the training forward (which moves them too: the caller sets them)."""
        found: dict[str, tf.Tensor] = {}
        self._logits(x, training=True, found=found)
        return found

    def _train(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        variables = [self.weights[i] for i in self.trained]
        with tf.GradientTape() as tape:
            logits = self._logits(x, training=True)
            if self.output is None:
                picked = tf.nn.log_softmax(logits) * tf.one_hot(y, int(logits.shape[-1]))
                loss = -tf.reduce_mean(tf.reduce_sum(picked, axis=-1))
            else:
                loss = tf.reduce_mean(tf.square(self._activated(logits) - y))
            if self.anchors:  # FedProx
                objective = loss + proximal(self.prox_mu, variables, self.anchors)
            else:
                objective = loss
        grads = tape.gradient(objective, variables)
        if self.scaffold:  # g + c - c_i; the raw g summed for get_gradient
            for total, g in zip(self.sums, grads, strict=True):
                total.assign_add(g)
            self.count.assign_add(1.0)
            grads = [g + c for g, c in zip(grads, self.corrections, strict=True)]
        self.optimizer.apply(grads, variables)
        for i in self.trained:
            self.weights[i].assign(self.weights[i] * self.masks[i])
        return {"loss": loss}

    def _activated(self, logits: tf.Tensor) -> tf.Tensor:
        """The last layer's output from what ``_logits`` leaves (its activation not applied)."""
        return ACTIVATIONS[self.steps[-1].activation](logits)

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        output = self._activated(self._logits(x, training=False))
        return {"probs" if self.output is None else "output": output}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {f"w{i:03d}": w.read_value() for i, w in enumerate(self.weights)}

    def _set_weights(self, *values: tf.Tensor) -> dict[str, tf.Tensor]:
        for w, value in zip(self.weights, values, strict=True):
            w.assign(value)
        for slot in self.optimizer.slots:
            slot.assign(tf.zeros_like(slot))
        if self.anchors:  # FedProx: the round's trainable weights
            for anchor, i in zip(self.anchors, self.trained, strict=True):
                anchor.assign(values[i])
        if self.scaffold:  # a new round: no step taken from these weights yet
            for total in self.sums:
                total.assign(tf.zeros_like(total))
            self.count.assign(0.0)
        return {"ok": tf.constant(1)}

    def _set_masks(self, *values: tf.Tensor) -> dict[str, tf.Tensor]:
        for m, value in zip(self.masks, values, strict=True):
            m.assign(value)
        return {"ok": tf.constant(1)}

    def _set_lr(self, lr: tf.Tensor) -> dict[str, tf.Tensor]:
        self.optimizer.lr.assign(tf.reshape(lr, []))
        return {"ok": tf.constant(1)}

    def _set_correction(self, *values: tf.Tensor) -> dict[str, tf.Tensor]:
        for c, i in zip(self.corrections, self.trained, strict=True):
            c.assign(values[i])
        return {"ok": tf.constant(1)}

    def _get_gradient(self) -> dict[str, tf.Tensor]:
        steps = tf.maximum(self.count, 1.0)
        out = {f"g{i:03d}": tf.zeros(w.shape, tf.float32) for i, w in enumerate(self.weights)}
        for total, i in zip(self.sums, self.trained, strict=True):
            out[f"g{i:03d}"] = total / steps
        return out


# --- building and converting ---------------------------------------------------------------------


def build_trainable(
    model: tf_keras.Model,
    *,
    batch_size: int,
    optimizer: str = "sgd",
    learning_rate: float,
    momentum: float = 0.0,
    task: Task = Task.CLASSIFY,
    prox_mu: float = 0.0,
    scaffold: bool = False,
) -> bytes:
    """The LiteRT training artifact (see the module docstring) for a stripped tf_keras model.

    The model must be a graph of supported layers (``LAYERS``); a classifier ends in a softmax,
    a reconstruction (``task``) in any supported activation. Dropout is
    off in on-device training (it is the identity). The artifact's variables start at the model's
    weights, masks at ones and optimizer state at zero. ``momentum`` is ignored by Adam.
    ``prox_mu`` > 0 adds FedProx's proximal term to what ``train`` minimizes; ``scaffold`` adds
    SCAFFOLD's correction and the ``set_correction`` and ``get_gradient`` signatures (module
    docstring).

    Raises:
        ConfigError: an unknown optimizer or a hyperparameter out of range.
        ExportError: an unsupported layer or model shape, or the conversion fails.
    """
    hyper = _hyper(optimizer, batch_size, learning_rate, momentum, prox_mu)
    calls = graph.calls(model, _refused)
    weights = [tf.Variable(np.asarray(w, np.float32)) for w in model.get_weights()]
    index = {id(v): i for i, v in enumerate(model.weights)}
    if len(index) != len(weights):
        raise ExportError(f"model {model.name!r}: weights and get_weights() do not match")
    steps = []
    for layer, inputs in calls:
        if type(layer).__name__ == "PruneLowMagnitude":  # checked by name: no TF-MOT import here
            raise ExportError(
                f"layer {layer.name!r} is a pruning wrapper; strip the model first"
                " (converters.strip.strip)"
            )
        builder = LAYERS.get(type(layer))
        try:
            if builder is None:
                raise Unsupported("")
            step = builder(layer, [weights[index[id(v)]] for v in layer.weights])
            if not step.merge and len(inputs) != 1:
                raise Unsupported(f"{len(inputs)} inputs")
            steps.append(step)
        except Unsupported as exc:
            raise _unsupported(layer, str(exc)) from None
    if task is Task.CLASSIFY and (not steps or steps[-1].activation != "softmax"):
        raise ExportError(
            f"model {model.name!r} does not end in a softmax; the litert trainer needs one"
            ' (or use the keras trainer: trainer = "keras" in the device profile)'
        )
    trainable = [False] * len(weights)
    for v in model.trainable_weights:
        trainable[index[id(v)]] = True
    x_spec = tf.TensorSpec([batch_size, *sample_shape(model)], tf.float32, name="x")
    sources = [inputs for _, inputs in calls]
    output = None if task is Task.CLASSIFY else tuple(int(d) for d in model.output_shape[1:])
    module = _Trainable(
        steps,
        sources,
        weights,
        trainable,
        _OPTIMIZERS[optimizer],
        hyper,
        x_spec,
        output,
        prox_mu,
        scaffold,
    )
    content = _convert(module)
    _verify(content)
    return content


def _hyper(
    optimizer: str, batch_size: int, lr: float, momentum: float, prox_mu: float
) -> dict[str, float]:
    """The optimizer's keywords, once every hyperparameter is in range."""
    checks = [
        ("optimizer", optimizer in _OPTIMIZERS, f"one of {', '.join(_OPTIMIZERS)}", optimizer),
        ("batch_size", isinstance(batch_size, int) and batch_size >= 1, ">= 1", batch_size),
        ("learning_rate", math.isfinite(lr) and lr > 0, "> 0", lr),
        ("momentum", 0.0 <= momentum < 1.0, "in [0, 1)", momentum),
        ("prox_mu", math.isfinite(prox_mu) and prox_mu >= 0, "finite and >= 0", prox_mu),
    ]
    for name, ok, rule, value in checks:
        if not ok:
            raise ConfigError(f"trainable export: {name} must be {rule}, got {value!r}")
    return {"lr": float(lr), "momentum": float(momentum)}


def _refused(model: tf_keras.Model, reason: str) -> ExportError:
    return ExportError(
        f"model {model.name!r} cannot be trained by the litert trainer: {reason}"
        ' (use the keras trainer: trainer = "keras" in the device profile)'
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
        keys = [
            *SIGNATURES,
            SET_LR,
            *([MOMENTS] if module.followed else []),
            *(SCAFFOLD_SIGNATURES if module.scaffold else ()),
        ]
        signatures = {key: getattr(module, key).get_concrete_function() for key in keys}
        tf.saved_model.save(module, str(folder), signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(folder), signature_keys=keys)
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
        for key in interpreter.get_signature_list():
            runner = interpreter.get_signature_runner(key)
            details = runner.get_input_details().items()
            runner(**{name: np.zeros(d["shape"], d["dtype"]) for name, d in details})
    except (ModelError, ValueError, RuntimeError) as exc:
        raise ExportError(
            f"the trainable artifact does not run in LiteRT: {short_reason(exc)}"
        ) from exc
