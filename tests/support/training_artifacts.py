"""LiteRT training artifacts for the converters' tests: built lazily from trainable_models.BUILDS,
run as a device runs them, and the same training steps taken in tf_keras to compare with.

A test helper, kept out of the installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from keras_models import SPARSITY
from trainable_models import BUILDS

from fedprune.converters.trainable import SIGNATURES, build_trainable
from fedprune.edge_client.litert_trainer import GET_GRADIENT, SCAFFOLD_SIGNATURES, SET_LR

BATCH = 32
LR, MOMENTUM, ADAM_LR = 0.05, 0.9, 0.01


@dataclass(frozen=True)
class Case:
    """A model and its training artifact."""

    model: tf_keras.Model
    artifact: bytes
    optimizer: str

    def data(self, x: np.ndarray) -> np.ndarray:
        return x.reshape((-1, *self.model.input_shape[1:]))


class Cases(dict[str, Case]):
    """The cases of BUILDS by name, each built the first time it is asked for; their artifacts
    with FedProx's term at ``prox_mu``, and SCAFFOLD's correction with ``scaffold``."""

    def __init__(self, prox_mu: float = 0.0, *, scaffold: bool = False) -> None:
        super().__init__()
        self.prox_mu = prox_mu
        self.scaffold = scaffold

    def __missing__(self, key: str) -> Case:
        build, optimizer = BUILDS[key]
        model = build()
        lr = ADAM_LR if optimizer == "adam" else LR
        artifact = build_trainable(
            model,
            batch_size=BATCH,
            optimizer=optimizer,
            learning_rate=lr,
            momentum=MOMENTUM,
            prox_mu=self.prox_mu,
            scaffold=self.scaffold,
        )
        self[key] = Case(model=model, artifact=artifact, optimizer=optimizer)
        return self[key]


class Device:
    """The artifact in one LiteRT interpreter, as a device runs it (no TensorFlow involved)."""

    RESOLVERS = {
        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        "xnnpack": OpResolverType.AUTO,
    }

    def __init__(self, artifact: bytes, resolver: str = "builtin") -> None:
        self.interpreter = Interpreter(
            model_content=artifact, experimental_op_resolver_type=self.RESOLVERS[resolver]
        )
        found = self.interpreter.get_signature_list()
        self.run = {
            key: self.interpreter.get_signature_runner(key)
            for key in (*SIGNATURES, SET_LR, *SCAFFOLD_SIGNATURES)
            if key in found
        }

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.run["set_weights"](**{f"w{i:03d}": w for i, w in enumerate(weights)})

    def set_masks(self, masks: list[np.ndarray | None], weights: list[np.ndarray]) -> None:
        full = [_ones_if_none(m, w.shape) for w, m in zip(weights, masks, strict=True)]
        self.run["set_masks"](**{f"m{i:03d}": m for i, m in enumerate(full)})

    def set_lr(self, lr: float) -> None:
        self.run[SET_LR](lr=np.array([lr], np.float32))

    def set_correction(self, correction: list[np.ndarray]) -> None:
        self.run["set_correction"](**{f"c{i:03d}": c for i, c in enumerate(correction)})

    def get_gradient(self) -> list[np.ndarray]:
        out = self.run[GET_GRADIENT]()
        return [out[f"g{i:03d}"] for i in range(len(out))]

    def get_weights(self) -> list[np.ndarray]:
        out = self.run["get_weights"]()
        return [out[f"w{i:03d}"] for i in range(len(out))]

    def train(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.run["train"](x=x, y=y)["loss"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        count = -(-len(x) // BATCH)
        padded = np.resize(x, (count * BATCH, *x.shape[1:]))
        probs = [self.run["infer"](x=b)["probs"] for b in np.split(padded, count)]
        return np.concatenate(probs)[: len(x)]


def random_masks(weights: list[np.ndarray], seed: int = 0) -> list[np.ndarray | None]:
    """Random SPARSITY masks for kernels, None for biases (as in a codec Model)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.random(w.shape) >= SPARSITY).astype(np.float32) if w.ndim >= 2 else None
        for w in weights
    ]


def masked(weights: list[np.ndarray], masks: list[np.ndarray | None]) -> list[np.ndarray]:
    return [w if m is None else w * m for w, m in zip(weights, masks, strict=True)]


def epoch_batches(n: int, seed: int) -> list[np.ndarray]:
    """Sample indices of one epoch in full batches, the last one topped up from the start."""
    order = np.random.default_rng(seed).permutation(n)
    count = -(-n // BATCH)
    return list(np.resize(order, count * BATCH).reshape(count, BATCH))


def first_batches(
    case: Case, x: np.ndarray, y: np.ndarray, count: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``count`` batches of an epoch (seed 3) of ``x`` in the case's input shape."""
    x = case.data(x)
    return [(x[idx], y[idx]) for idx in epoch_batches(len(x), seed=3)[:count]]


def keras_steps(
    case: Case,
    weights: list[np.ndarray],
    masks: list[np.ndarray | None],
    batches: list[tuple[np.ndarray, np.ndarray]],
    *,
    training: bool = True,
    lr: float | None = None,
    prox_mu: float = 0.0,
) -> tuple[list[np.ndarray], list[float]]:
    """The same steps in tf_keras, as edge_client/keras_trainer.py takes them: at ``lr`` (None:
    the case's), and with ``prox_mu`` minimizing the loss plus FedProx's proximal term,
    ``prox_mu / 2`` times the squared distance of the trainable variables from ``weights``. The
    losses are the data losses alone."""
    weights, losses, _ = keras_corrected_steps(
        case, weights, masks, batches, training=training, lr=lr, prox_mu=prox_mu
    )
    return weights, losses


def keras_corrected_steps(
    case: Case,
    weights: list[np.ndarray],
    masks: list[np.ndarray | None],
    batches: list[tuple[np.ndarray, np.ndarray]],
    *,
    training: bool = True,
    lr: float | None = None,
    prox_mu: float = 0.0,
    correction: list[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], list[float], list[np.ndarray]]:
    """:func:`keras_steps`, each gradient of a trainable variable plus its ``correction`` (one
    array per weight, in ``get_weights`` order; SCAFFOLD's), and also the mean over the steps of
    the raw gradients (without it) per weight, zeros for the weights that are not trainable."""
    model = tf_keras.models.clone_model(case.model)
    model.set_weights(weights)
    variables = model.trainable_variables
    anchors = [tf.constant(v.numpy()) for v in variables]
    if case.optimizer == "adam":
        optimizer: Any = tf_keras.optimizers.Adam(ADAM_LR if lr is None else lr)
    else:
        optimizer = tf_keras.optimizers.SGD(LR if lr is None else lr, momentum=MOMENTUM)
    optimizer.build(variables)
    loss_fn = tf_keras.losses.SparseCategoricalCrossentropy()
    index = {id(w): i for i, w in enumerate(model.weights)}
    mask_vars = [tf.constant(_ones_if_none(masks[index[id(v)]], v.shape)) for v in variables]
    added = [
        tf.constant(
            np.zeros(v.shape, np.float32) if correction is None else correction[index[id(v)]]
        )
        for v in variables
    ]

    @tf.function
    def step(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=training))
            distance = sum(
                tf.reduce_sum((v - a) ** 2) for v, a in zip(variables, anchors, strict=True)
            )
            objective = loss + prox_mu / 2 * distance if prox_mu else loss
        grads = tape.gradient(objective, variables)
        corrected = [g + c for g, c in zip(grads, added, strict=True)]
        optimizer.apply_gradients(zip(corrected, variables, strict=True))
        for variable, mask in zip(variables, mask_vars, strict=True):
            variable.assign(variable * mask)
        return loss, grads

    losses, mean = [], [np.zeros(w.shape, np.float64) for w in weights]
    for x, y in batches:
        loss, grads = step(x, y)
        losses.append(float(loss))
        for v, g in zip(variables, grads, strict=True):
            mean[index[id(v)]] += g.numpy() / len(batches)
    return model.get_weights(), losses, [m.astype(np.float32) for m in mean]


def _ones_if_none(mask: np.ndarray | None, shape: Any) -> np.ndarray:
    return np.ones(shape, np.float32) if mask is None else mask


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
