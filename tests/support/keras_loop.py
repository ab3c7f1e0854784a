"""The keras trainer's tests' model, data and reference: an MLP with BatchNormalization, a masked
start, and a hand-written tf_keras loop that takes the steps the trainer should take.

TensorFlow is imported inside the functions, so that a test module skips (``importorskip``)
before anything here needs it. A test helper, kept out of the installed package; pytest finds it
through ``pythonpath``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedprune.edge_client.trainer import batches
from fedprune.protocol.codec import Model
from fedprune.protocol.messages import Spec

BATCH, LR, MOMENTUM = 16, 0.05, 0.9


def spec(optimizer: str = "sgd", **fields: Any) -> Spec:
    """An MLP with BatchNormalization (its moving statistics are not trainable) and 4 classes."""
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((12,)),
            tf_keras.layers.Dense(16, activation="tanh"),
            tf_keras.layers.BatchNormalization(),
            tf_keras.layers.Dense(4, activation="softmax"),
        ]
    )
    made = Spec(
        model_json=model.to_json(),
        input_shape=[12],
        optimizer=optimizer,
        learning_rate=LR,
        momentum=MOMENTUM,
        local_epochs=1,
        batch_size=BATCH,
    )
    return dataclasses.replace(made, **fields)


def start(spec: Spec) -> Model:
    """The round's model: random weights, half of each kernel masked."""
    import tf_keras

    shapes = [w.shape for w in tf_keras.models.model_from_json(spec.model_json).get_weights()]
    rng = np.random.default_rng(1)
    masks = [(rng.random(s) > 0.5).astype(np.float32) if len(s) == 2 else None for s in shapes]
    weights = [rng.normal(0, 0.5, s).astype(np.float32) for s in shapes]
    weights[5] = np.abs(weights[5]) + np.float32(0.5)  # the moving variance
    return Model(
        weights=[w if m is None else w * m for w, m in zip(weights, masks, strict=True)],
        masks=masks,
    )


def data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.normal(size=(n, 12)).astype(np.float32), rng.integers(0, 4, n).astype(np.int64)


@dataclass(frozen=True)
class Reference:
    """What the loop leaves: the trainable weights (``model.trainable_variables`` order), and the
    mean over its steps of each weight's raw gradient (``get_weights`` order, zeros for the
    weights that are not trainable)."""

    trainable: list[np.ndarray]
    gradient: list[np.ndarray]


def reference(
    spec: Spec,
    start: Model,
    *,
    mu: float,
    epochs: int,
    seed: int,
    correction: list[np.ndarray] | None = None,
) -> Reference:
    """The steps on :func:`data` taken by tf_keras one by one: the loss plus
    ``mu / 2 * ||w - start||^2`` (the trainable weights only), each gradient plus its
    ``correction`` (SCAFFOLD's, one array per weight in ``get_weights`` order), the masks applied
    after each step."""
    import tensorflow as tf
    import tf_keras

    model = tf_keras.models.model_from_json(spec.model_json)
    model.set_weights(start.weights)
    variables = model.trainable_variables
    anchors = [tf.constant(v.numpy()) for v in variables]
    index = {id(w): i for i, w in enumerate(model.weights)}
    masks = [start.masks[index[id(v)]] for v in variables]
    masks = [
        tf.ones(v.shape) if m is None else tf.constant(m)
        for v, m in zip(variables, masks, strict=True)
    ]
    added = [
        0.0 if correction is None else tf.constant(correction[index[id(v)]]) for v in variables
    ]
    if spec.optimizer == "adam":
        optimizer = tf_keras.optimizers.Adam(spec.learning_rate)
    else:
        optimizer = tf_keras.optimizers.SGD(spec.learning_rate, momentum=spec.momentum)
    loss_fn = tf_keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            loss += (
                mu
                / 2
                * sum(tf.reduce_sum((v - a) ** 2) for v, a in zip(variables, anchors, strict=True))
            )
        grads = tape.gradient(loss, variables)
        corrected = [g + c for g, c in zip(grads, added, strict=True)]
        optimizer.apply_gradients(zip(corrected, variables, strict=True))
        for v, m in zip(variables, masks, strict=True):
            v.assign(v * m)
        return grads

    x, y = data()
    rng = np.random.default_rng(seed)
    total = [np.zeros(w.shape, np.float64) for w in start.weights]
    steps = 0
    for _ in range(epochs):
        for idx in batches(len(x), BATCH, rng):
            for v, g in zip(variables, step(x[idx], y[idx]), strict=True):
                total[index[id(v)]] += g.numpy()
            steps += 1
    return Reference(
        trainable=[v.numpy() for v in variables],
        gradient=[(t / steps).astype(np.float32) for t in total],
    )


def trainable(spec: Spec, weights: list[np.ndarray]) -> list[np.ndarray]:
    """The trainable ones of a ``get_weights()`` list, as ``model.trainable_variables`` orders."""
    import tf_keras

    model = tf_keras.models.model_from_json(spec.model_json)
    index = {id(w): i for i, w in enumerate(model.weights)}
    return [weights[index[id(v)]] for v in model.trainable_variables]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
