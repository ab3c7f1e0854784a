"""The ``keras`` trainer: tf_keras on the device (TensorFlow is imported only when it is built).

The architecture arrives over the network as JSON. Building it is the one place where a device
turns network data into code, so only an allow-list of plain layer classes and named activations
is built: a ``Lambda`` (which carries Python bytecode) or any custom class is refused with one line
before TensorFlow sees the JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fedprune.edge_client.task import Evaluation, Task
from fedprune.edge_client.trainer import EpochHook, Trainer, batches, calibrated
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import Spec

ALLOWED_LAYERS = frozenset(
    {
        "Sequential",
        "Functional",
        "Model",
        "InputLayer",
        "Dense",
        "Conv1D",
        "Conv2D",
        "DepthwiseConv2D",
        "SeparableConv2D",
        "MaxPooling1D",
        "MaxPooling2D",
        "AveragePooling1D",
        "AveragePooling2D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "ZeroPadding2D",
        "Flatten",
        "Reshape",
        "Dropout",
        "BatchNormalization",
        "LayerNormalization",
        "Activation",
        "ReLU",
        "LeakyReLU",
        "Softmax",
        "Add",
        "Concatenate",
        "Multiply",
        "Average",
    }
)
"""Layer classes a device builds from the network's JSON; anything else is refused."""

ALLOWED_ACTIVATIONS = frozenset(
    {
        "linear",
        "relu",
        "relu6",
        "sigmoid",
        "hard_sigmoid",
        "tanh",
        "softmax",
        "softplus",
        "softsign",
        "elu",
        "selu",
        "gelu",
        "swish",
        "silu",
        "exponential",
    }
)


def check_architecture(model_json: str) -> None:
    """Refuse (``ConfigError``, one line) an architecture that names a layer class or an
    activation outside the allow-lists; nothing in it is built before this passes."""
    try:
        config = json.loads(model_json)
    except ValueError as exc:
        raise ConfigError(f"the run's model architecture is not JSON ({exc})") from exc
    for layer in _layers(config):
        kind = layer.get("class_name")
        if not isinstance(kind, str) or kind not in ALLOWED_LAYERS:
            name = layer.get("config", {}).get("name", "?")
            raise ConfigError(
                f"the run's model has layer {name!r} of class {kind!r}, which devices do not"
                " build from the network (only plain Keras layers: no Lambda, no custom class)"
            )
        activation = layer.get("config", {}).get("activation", "linear")
        if not isinstance(activation, str) or activation not in ALLOWED_ACTIVATIONS:
            raise ConfigError(
                f"the run's model has an activation {str(activation)[:60]!r} that devices do not"
                f" build (one of {', '.join(sorted(ALLOWED_ACTIVATIONS))})"
            )


def _layers(config: Any) -> Iterator[dict[str, Any]]:
    """Every layer record in a Keras model config, nested models included."""
    if not isinstance(config, dict) or not isinstance(config.get("config", {}), dict):
        raise ConfigError("the run's model architecture is not a Keras model config")
    yield config
    for layer in config.get("config", {}).get("layers", []) or []:
        yield from _layers(layer)


def proximal(mu: Any, variables: Sequence[Any], anchors: Sequence[Any]) -> Any:
    """FedProx's proximal term (Li et al. 2020), ``mu / 2 * sum ||w - anchor||^2``, as a float32
    tensor. The litert artifact (converters.trainable) adds the same expression to its loss, so
    that both trainers take the same gradient, ``mu * (w - anchor)``."""
    import tensorflow as tf

    squares = [tf.reduce_sum(tf.square(w - a)) for w, a in zip(variables, anchors, strict=True)]
    return mu / 2 * tf.add_n(squares)


def _all_layers(model: Any) -> Iterator[Any]:
    """The layers of ``model``, those of nested models in their place."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
        else:
            yield layer


class KerasTrainer(Trainer):
    """Builds the run's architecture once; each round trains a few epochs in a compiled step that
    multiplies every masked weight by its mask right after the optimizer update. With
    ``spec.prox_mu`` the step minimizes the loss plus FedProx's term (:func:`proximal`) toward
    the trainable weights the round started from; it returns the data loss alone. With
    ``spec.scaffold`` the step adds SCAFFOLD's correction (variables set per fit) to each
    gradient, and sums the raw gradients and counts its steps for :meth:`mean_gradient`."""

    def __init__(self, spec: Spec, *, artifact: bytes | None = None) -> None:
        super().__init__(spec)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
        import tf_keras

        check_architecture(spec.model_json)
        self._tf = tf
        self._keras = tf_keras
        self.model = tf_keras.models.model_from_json(spec.model_json)
        self._loss = (
            tf_keras.losses.SparseCategoricalCrossentropy()
            if self.task is Task.CLASSIFY
            else tf_keras.losses.MeanSquaredError()
        )
        if spec.optimizer == "adam":
            self._optimizer: Any = tf_keras.optimizers.Adam(spec.learning_rate)
        else:
            self._optimizer = tf_keras.optimizers.SGD(spec.learning_rate, momentum=spec.momentum)
        self._optimizer.build(self.model.trainable_variables)
        self._masks = [
            tf.Variable(tf.ones_like(v), trainable=False) for v in self.model.trainable_variables
        ]
        self._anchors = (
            [tf.Variable(v, trainable=False) for v in self.model.trainable_variables]
            if spec.prox_mu > 0
            else []
        )
        scaffold = self.model.trainable_variables if spec.scaffold else []
        self._corrections = [tf.Variable(tf.zeros_like(v), trainable=False) for v in scaffold]
        self._sums = [tf.Variable(tf.zeros_like(v), trainable=False) for v in scaffold]
        self._count = tf.Variable(0.0, trainable=False)
        self._step = tf.function(self._train_step)
        found = list(_all_layers(self.model))
        norms = [la for la in found if isinstance(la, tf_keras.layers.BatchNormalization)]
        self._norms = [la for la in norms if la.trainable]  # what _statistics sets
        self._drops = [la for la in found if isinstance(la, tf_keras.layers.Dropout)]
        self._index = {id(w): i for i, w in enumerate(self.model.weights)}

    def _train_step(self, x: Any, y: Any) -> Any:
        tf = self._tf
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = self._loss(y, self.model(x, training=True))
            objective = (
                loss + proximal(self.spec.prox_mu, variables, self._anchors)
                if self._anchors
                else loss
            )
        grads = tape.gradient(objective, variables)
        if self._corrections:  # SCAFFOLD: g + c - c_i; the raw g summed for mean_gradient
            for total, g in zip(self._sums, grads, strict=True):
                total.assign_add(g)
            self._count.assign_add(1.0)
            grads = [g + c for g, c in zip(grads, self._corrections, strict=True)]
        self._optimizer.apply_gradients(zip(grads, variables, strict=True))
        for variable, mask in zip(variables, self._masks, strict=True):
            variable.assign(variable * mask)
        return loss

    def _load(
        self, model: Model, learning_rate: float, correction: list[np.ndarray] | None
    ) -> None:
        """The round's weights, masks, anchors and SCAFFOLD correction (``None``: zeros), a fresh
        optimizer at ``learning_rate``, no gradient summed yet."""
        self._check_scaffold(correction)
        self.model.set_weights(model.weights)
        index = self._index
        for variable, mask_var in zip(self.model.trainable_variables, self._masks, strict=True):
            i = index[id(variable)]
            mask = model.masks[i]
            mask_var.assign(np.ones(variable.shape, np.float32) if mask is None else mask)
        for v in self._optimizer.variables:
            v.assign(self._tf.zeros_like(v))
        # A variable the compiled step reads: a new rate does not retrace it.
        self._optimizer.learning_rate = learning_rate
        if self._anchors:  # FedProx: the round's trainable weights
            for anchor, variable in zip(self._anchors, self.model.trainable_variables, strict=True):
                anchor.assign(variable)
        if self._corrections:  # SCAFFOLD: this round's correction, no gradient summed yet
            for variable, c, total in zip(
                self.model.trainable_variables, self._corrections, self._sums, strict=True
            ):
                zeros = self._tf.zeros_like(total)
                c.assign(zeros if correction is None else correction[index[id(variable)]])
                total.assign(zeros)
            self._count.assign(0.0)

    def fit(
        self,
        model: Model,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        seed: int,
        on_epoch: EpochHook | None = None,
        learning_rate: float | None = None,
        correction: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        self._load(model, self._rate(learning_rate), correction)
        targets = self.task.targets(x, y, self.model.output_shape[1:])
        rng = np.random.default_rng(seed)
        for epoch in range(1, epochs + 1):
            for idx in batches(len(x), self.spec.batch_size, rng):
                self._step(x[idx], targets[idx])
            if on_epoch is not None:
                on_epoch(epoch)
        weights = [np.asarray(w) for w in self.model.get_weights()]
        return calibrated(weights, self._statistics(x, seed))

    def mean_gradient(self) -> list[np.ndarray]:
        if not self.spec.scaffold:
            raise ValueError("the mean gradient is kept for a SCAFFOLD run only")
        out = [np.zeros(w.shape, np.float32) for w in self.model.weights]
        steps = max(float(self._count.numpy()), 1.0)
        for variable, total in zip(self.model.trainable_variables, self._sums, strict=True):
            out[self._index[id(variable)]] = (total.numpy() / np.float32(steps)).astype(np.float32)
        return out

    def _statistics(self, x: np.ndarray, seed: int) -> Iterator[dict[int, np.ndarray]]:
        """Per batch of one pass, the batch statistics each BatchNormalization's moving mean and
        variance follow (as the litert artifact's ``moments``): what one training step at
        momentum 0 sets them to, Dropout off (the litert artifact has none in training)."""
        norms, drops, index = self._norms, self._drops, self._index
        if not norms:
            return
        saved = [la.momentum for la in norms], [la.rate for la in drops]
        for la in norms:
            la.momentum = 0.0
        for la in drops:
            la.rate = 0.0
        try:
            for idx in batches(len(x), self.spec.batch_size, np.random.default_rng(seed)):
                self.model(x[idx], training=True)
                yield {
                    index[id(v)]: v.numpy()
                    for la in norms
                    for v in (la.moving_mean, la.moving_variance)
                }
        finally:
            for la, momentum in zip(norms, saved[0], strict=True):
                la.momentum = momentum
            for la, rate in zip(drops, saved[1], strict=True):
                la.rate = rate

    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> Evaluation:
        self.model.set_weights(weights)
        return self.task.evaluate(self.model(x, training=False).numpy(), x, y)
