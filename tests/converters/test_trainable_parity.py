"""The LiteRT training artifact against tf_keras, layer kind by layer kind: inference, and training
steps (SGD with momentum, Adam) that match step for step, masks included; the hand-written
activation gradients they rest on.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from training_artifacts import (
    BATCH,
    LR,
    MOMENTUM,
    Cases,
    Device,
    epoch_batches,
    keras_steps,
    masked,
    max_diff,
    random_masks,
)

from fedprune.converters.training_layers import ACTIVATIONS

pytestmark = pytest.mark.slow

PARITY = 1e-5  # measured: <= 1.2e-6 (weights) and <= 4.8e-7 (losses) over one epoch
# BatchNormalization divides by the batch's deviation, which scales rounding up, and tf_keras runs
# a fused kernel on 4-D inputs: measured <= 1.2e-5 (weights) and <= 3.1e-6 (losses) over one epoch.
PARITY_OF = {"batch-norm": 5e-5, "residual": 5e-5}
Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def test_hard_sigmoid_matches_tf_keras_forward_and_gradient_exactly() -> None:
    # Prepare: a grid over both bends (x = -2.5 and 2.5), the bends and their float neighbours.
    bends = np.array([-2.5, 2.5], np.float32)
    x = tf.constant(
        np.concatenate(
            [
                np.linspace(-4, 4, 8001, dtype=np.float32),
                bends,
                np.nextafter(bends, np.float32(-np.inf)),
                np.nextafter(bends, np.float32(np.inf)),
            ]
        )
    )
    dy = tf.constant(np.random.default_rng(0).normal(size=x.shape).astype(np.float32))

    # Execute
    results = []
    for fn in (ACTIVATIONS["hard_sigmoid"], tf_keras.activations.hard_sigmoid):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        results.append((y.numpy(), tape.gradient(y, x, output_gradients=dy).numpy()))

    # Assert: tf_keras 2's clip(0.2 * x + 0.5, 0, 1), to the bit, its gradient too.
    (got, got_grad), (want, want_grad) = results
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_grad, want_grad)
    assert (got.min(), got.max()) == (0.0, 1.0)
    assert 0 < np.count_nonzero(got_grad) < got_grad.size


@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        "cnn",
        "zoo",
        "functional-stripped",
        "batch-norm",
        "nested",
        "residual",
        "mobile",
        "sequence",
        "hard-sigmoid",
        "hard-swish",
        "resnet8",
        "dscnn",
        "mobilenet",
    ],
)
def test_infer_matches_keras_after_set_weights(
    training_cases: Cases, digits: Digits, name: str
) -> None:
    case = training_cases[name]
    rng = np.random.default_rng(1)
    weights = [
        w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in case.model.get_weights()
    ]
    keras = tf_keras.models.clone_model(case.model)
    keras.set_weights(weights)
    x = case.data(digits[2])
    device = Device(case.artifact)

    device.set_weights(weights)
    probs = device.predict(x)

    assert np.abs(probs - keras.predict(x, verbose=0)).max() < 1e-4


@pytest.mark.parametrize("resolver", ["builtin", "xnnpack"])
@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        "cnn",
        "mlp-tanh-adam",
        "cnn-tanh-adam",
        "zoo",
        "functional-stripped",
        "batch-norm",
        "residual",
        "mobile",
        "sequence",
        "hard-sigmoid",
        "hard-swish",
    ],
)
def test_one_masked_epoch_matches_tf_keras(
    training_cases: Cases, digits: Digits, name: str, resolver: str
) -> None:
    # Prepare: the same starting weights, 80% masks and batches on both sides.
    case = training_cases[name]
    masks = random_masks(case.model.get_weights())
    start = masked(case.model.get_weights(), masks)
    x, y = case.data(digits[0]), digits[1]
    batches = [(x[idx], y[idx]) for idx in epoch_batches(len(x), seed=3)]
    # The zoo's Dropout is the identity on the device; Keras matches that with training=False.
    want, want_losses = keras_steps(case, start, masks, batches, training=name != "zoo")
    device = Device(case.artifact, resolver)
    device.set_weights(start)
    device.set_masks(masks, start)

    # Execute
    losses = [device.train(xb, yb) for xb, yb in batches]

    # Assert
    got = device.get_weights()
    assert max_diff(got, want) < PARITY_OF.get(name, PARITY)
    assert np.abs(np.array(losses) - want_losses).max() < PARITY_OF.get(name, PARITY)
    for weight, mask in zip(got, masks, strict=True):
        if mask is not None:
            assert np.all(weight[mask == 0] == 0.0)


@pytest.mark.parametrize("name", ["resnet8", "mobilenet"])
def test_a_step_of_the_mlperf_presets_matches_tf_keras(
    training_cases: Cases, digits: Digits, name: str
) -> None:
    """One step, not an epoch: these deeper presets normalize channels the 80% masks leave nearly
    empty (BatchNormalization divides by their tiny deviation), which amplifies float rounding
    step after step, in tf_keras as here (measured after 1, 2 and 5 steps: resnet8 8.6e-6, 1.8e-5,
    4.3e-5; mobilenet 1.2e-5, 1.5e-4, 7.2e-2)."""
    case = training_cases[name]
    masks = random_masks(case.model.get_weights())
    start = masked(case.model.get_weights(), masks)
    x, y = case.data(digits[0]), digits[1]
    batches = [(x[idx], y[idx]) for idx in epoch_batches(len(x), seed=3)[:1]]
    want, want_losses = keras_steps(case, start, masks, batches)
    device = Device(case.artifact)
    device.set_weights(start)
    device.set_masks(masks, start)

    losses = [device.train(xb, yb) for xb, yb in batches]

    assert max_diff(device.get_weights(), want) < 1e-4
    assert np.abs(np.array(losses) - want_losses).max() < 1e-5


def test_one_sgd_step_with_batch_normalization_matches_train_on_batch(
    training_cases: Cases, digits: Digits
) -> None:
    # Prepare: the plain SGD step of Model.fit, moving statistics included.
    case = training_cases["batch-norm"]
    x, y = digits[0][:BATCH], digits[1][:BATCH]
    keras = tf_keras.models.clone_model(case.model)
    keras.set_weights(case.model.get_weights())
    keras.compile(tf_keras.optimizers.SGD(LR, momentum=MOMENTUM), "sparse_categorical_crossentropy")
    device = Device(case.artifact)

    # Execute
    loss = device.train(x, y)
    want_loss = keras.train_on_batch(x, y)

    # Assert
    got, want = device.get_weights(), keras.get_weights()
    names = [w.name for w in keras.weights]
    moving = [i for i, name in enumerate(names) if "moving_" in name]
    frozen = [i for i, name in enumerate(names) if name.startswith("bn_frozen/")]
    assert len(got) == len(want) == 15  # conv 1, bn_conv 4, bn_frozen 3, dense 2, bn_dense 3, 2
    assert abs(loss - want_loss) < 1e-5
    assert max_diff(got, want) < 1e-4
    start = case.model.get_weights()
    assert all(np.abs(got[i] - start[i]).max() > 1e-4 for i in moving if i not in frozen)
    assert all(np.array_equal(got[i], start[i]) for i in frozen)
