"""The LiteRT training artifact as a device gets it: builtin ops only, the signature contract,
weights in and out, a fresh optimizer after set_weights, learning under a mask, and models as the
coordinator hands them over (stripped, or loaded from a file). test_trainable_parity.py checks
its steps against tf_keras.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from keras_models import SPARSITY
from trainable_models import functional
from training_artifacts import (
    BATCH,
    LR,
    Cases,
    Device,
    epoch_batches,
    masked,
    max_diff,
    random_masks,
)

from fedprune.converters.strip import load_keras
from fedprune.converters.trainable import build_trainable

pytestmark = pytest.mark.slow

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        "cnn",
        "zoo",
        "functional-stripped",
        "batch-norm",
        "residual",
        "mobile",
        "hard-sigmoid",
        "hard-swish",
        "resnet8",
    ],
)
def test_artifact_holds_builtin_ops_only(training_cases: Cases, name: str) -> None:
    artifact = training_cases[name].artifact

    codes = schema.ModelT.InitFromPackedBuf(artifact, 0).operatorCodes

    builtin = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in codes]
    assert [c.customCode for c in codes if c.customCode] == []
    assert schema.BuiltinOperator.CUSTOM not in builtin
    assert b"Flex" not in artifact
    assert schema.BuiltinOperator.VAR_HANDLE in builtin  # weights are resource variables


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_signatures_follow_the_contract(training_cases: Cases, name: str) -> None:
    case = training_cases[name]
    shapes = [w.shape for w in case.model.get_weights()]
    sample = case.model.input_shape[1:]

    device = Device(case.artifact)

    w_names = [f"w{i:03d}" for i in range(len(shapes))]
    m_names = [f"m{i:03d}" for i in range(len(shapes))]
    assert device.interpreter.get_signature_list() == {
        "train": {"inputs": ["x", "y"], "outputs": ["loss"]},
        "infer": {"inputs": ["x"], "outputs": ["probs"]},
        "get_weights": {"inputs": [], "outputs": w_names},
        "set_weights": {"inputs": w_names, "outputs": ["ok"]},
        "set_masks": {"inputs": m_names, "outputs": ["ok"]},
        "set_lr": {"inputs": ["lr"], "outputs": ["ok"]},
    }
    train_in = device.run["train"].get_input_details()
    assert (tuple(train_in["x"]["shape"]), train_in["x"]["dtype"]) == ((BATCH, *sample), np.float32)
    assert (tuple(train_in["y"]["shape"]), train_in["y"]["dtype"]) == ((BATCH,), np.int64)
    loss = device.run["train"].get_output_details()["loss"]
    assert (tuple(loss["shape"]), loss["dtype"]) == ((), np.float32)
    probs = device.run["infer"].get_output_details()["probs"]
    assert (tuple(probs["shape"]), probs["dtype"]) == ((BATCH, 10), np.float32)
    out = device.run["get_weights"].get_output_details()
    assert [tuple(out[n]["shape"]) for n in w_names] == shapes
    set_in = device.run["set_weights"].get_input_details()
    assert [tuple(set_in[n]["shape"]) for n in w_names] == shapes
    assert device.run["set_weights"](
        **dict(zip(w_names, case.model.get_weights(), strict=True))
    ) == {"ok": 1}


def test_get_weights_round_trips_what_set_weights_wrote(training_cases: Cases) -> None:
    case = training_cases["cnn"]
    rng = np.random.default_rng(2)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in case.model.get_weights()]
    device = Device(case.artifact)
    assert max_diff(device.get_weights(), case.model.get_weights()) == 0.0  # starts at the model

    device.set_weights(weights)

    for got, want in zip(device.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["mlp", "mlp-tanh-adam"])
def test_set_weights_starts_a_fresh_optimizer(
    training_cases: Cases, digits: Digits, name: str
) -> None:
    case = training_cases[name]
    start = case.model.get_weights()
    x, y = case.data(digits[0]), digits[1]
    used, fresh = Device(case.artifact), Device(case.artifact)
    for idx in epoch_batches(len(x), seed=4)[:5]:
        used.train(x[idx], y[idx])  # momentum / Adam moments and step are now non-zero

    used.set_weights(start)
    fresh.set_weights(start)
    for idx in epoch_batches(len(x), seed=5)[:3]:
        used.train(x[idx], y[idx])
        fresh.train(x[idx], y[idx])

    for a, b in zip(used.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_training_under_an_80_percent_mask_keeps_zeros_and_learns(
    training_cases: Cases, digits: Digits
) -> None:
    # Prepare
    case = training_cases["mlp"]
    masks = random_masks(case.model.get_weights(), seed=6)
    start = masked(case.model.get_weights(), masks)
    x_train, y_train, x_test, y_test = digits
    x_train, x_test = case.data(x_train), case.data(x_test)
    device = Device(case.artifact)
    device.set_weights(start)
    device.set_masks(masks, start)
    before = float(np.mean(np.argmax(device.predict(x_test), axis=1) == y_test))

    # Execute
    for epoch in range(8):
        for idx in epoch_batches(len(x_train), seed=10 + epoch):
            device.train(x_train[idx], y_train[idx])

    # Assert
    weights = device.get_weights()
    accuracy = float(np.mean(np.argmax(device.predict(x_test), axis=1) == y_test))
    assert before < 0.3
    assert accuracy > 0.85
    for weight, mask in zip(weights, masks, strict=True):
        if mask is not None:
            assert np.all(weight[mask == 0] == 0.0)
            assert np.count_nonzero(weight == 0) / weight.size >= SPARSITY - 0.01
            assert np.count_nonzero(weight[mask == 1]) == np.count_nonzero(mask)


def test_functional_model_stripped_of_pruning_wrappers_trains_on_the_device(
    training_cases: Cases, digits: Digits
) -> None:
    # Prepare: issue 8's model as the coordinator hands it over (wrapped by TF-MOT, stripped).
    case = training_cases["functional-stripped"]
    x_train, y_train, x_test, _ = digits
    device = Device(case.artifact)
    batches = epoch_batches(len(x_train), seed=7)

    # Execute
    probs = device.predict(x_test)
    losses = [device.train(x_train[idx], y_train[idx]) for idx in batches]

    # Assert
    assert np.abs(probs - case.model.predict(x_test, verbose=0)).max() < 1e-5
    assert losses[0] > 2.0  # ten classes, untrained: about ln(10)
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_functional_model_loaded_from_a_file_builds(
    tmp_path: Path, digits: Digits, suffix: str
) -> None:
    # Prepare
    functional().save(tmp_path / f"functional{suffix}")
    model = load_keras(tmp_path / f"functional{suffix}")
    x = digits[2]

    # Execute
    device = Device(build_trainable(model, batch_size=BATCH, learning_rate=LR))

    # Assert
    assert max_diff(device.get_weights(), model.get_weights()) == 0.0
    assert np.abs(device.predict(x) - model.predict(x, verbose=0)).max() < 1e-5
