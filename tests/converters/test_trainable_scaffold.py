"""The LiteRT training artifact's SCAFFOLD signatures against tf_keras: steps after
``set_correction`` match tf_keras steps whose gradients get the same correction (SGD with
momentum and BatchNormalization; Adam), ``get_gradient`` is the mean of tf_keras's raw gradients
over the steps since ``set_weights``, and an artifact built without SCAFFOLD has none of it.
"""

from __future__ import annotations

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from training_artifacts import (
    Case,
    Cases,
    Device,
    first_batches,
    keras_corrected_steps,
    keras_steps,
    masked,
    max_diff,
    random_masks,
)

from fedprune.edge_client.litert_trainer import SCAFFOLD_SIGNATURES, SET_LR, SIGNATURES

pytestmark = pytest.mark.slow

STEPS = 4
NAMES = ("batch-norm", "mlp-tanh-adam")  # SGD with momentum and BatchNormalization; Adam
# Measured after STEPS steps: <= 2.9e-7 (weights), 4.8e-7 (losses) and 1.8e-6 (mean gradients,
# which reach 1.0); a correction 1% off moves the weights by 7e-4 or more.
PARITY = 1e-5
Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def scaffold_cases() -> Cases:
    """Artifacts built for SCAFFOLD (NAMES), each built when a test first asks for it."""
    return Cases(scaffold=True)


def _correction(weights: list[np.ndarray], masks: list[np.ndarray | None]) -> list[np.ndarray]:
    """A correction of about the gradients' size, zero where pruned, one for every weight (those
    of the moving statistics too: the artifact must leave them out)."""
    rng = np.random.default_rng(5)
    return masked([rng.normal(0, 0.05, w.shape).astype(np.float32) for w in weights], masks)


def _untrained(case: Case) -> list[int]:
    trained = {id(v) for v in case.model.trainable_weights}
    return [i for i, w in enumerate(case.model.weights) if id(w) not in trained]


@pytest.mark.parametrize("name", NAMES)
def test_corrected_steps_and_the_mean_gradient_match_tf_keras(
    scaffold_cases: Cases, digits: Digits, name: str
) -> None:
    # Prepare
    case = scaffold_cases[name]
    masks = random_masks(case.model.get_weights())
    start = masked(case.model.get_weights(), masks)
    correction = _correction(start, masks)
    batches = first_batches(case, digits[0], digits[1], STEPS)
    want, want_losses, want_gradient = keras_corrected_steps(
        case, start, masks, batches, correction=correction
    )
    plain, _ = keras_steps(case, start, masks, batches)
    device = Device(case.artifact)
    device.set_weights(start)
    device.set_masks(masks, start)

    # Execute
    device.set_correction(correction)
    losses = [device.train(xb, yb) for xb, yb in batches]
    gradient = device.get_gradient()

    # Assert: tf_keras's corrected steps, far from the plain ones; the mean raw gradient, zeros
    # for the weights no optimizer trains (moving statistics, a frozen layer's)
    assert max_diff(device.get_weights(), want) < PARITY
    assert max_diff(device.get_weights(), plain) > 100 * PARITY
    assert np.abs(np.array(losses) - want_losses).max() < PARITY
    assert max_diff(gradient, want_gradient) < PARITY
    untrained = _untrained(case)
    assert len(untrained) == (7 if name == "batch-norm" else 0)
    assert all(not np.any(gradient[i]) for i in untrained)
    trained = [g for i, g in enumerate(gradient) if i not in untrained]
    assert min(float(np.abs(g).max()) for g in trained) > 1e-4


def test_set_weights_starts_the_gradient_sums_again(scaffold_cases: Cases, digits: Digits) -> None:
    # Prepare: a device that took steps of a round
    case = scaffold_cases["mlp-tanh-adam"]
    start = case.model.get_weights()
    batches = first_batches(case, digits[0], digits[1], STEPS)
    device = Device(case.artifact)
    device.set_weights(start)
    for xb, yb in batches[:3]:
        device.train(xb, yb)

    # Execute: the next round starts, takes one step
    device.set_weights(start)
    before = device.get_gradient()
    device.train(*batches[3])
    after = device.get_gradient()

    # Assert: nothing summed before its step, then that step's gradient alone
    _, _, want = keras_corrected_steps(case, start, [None] * len(start), batches[3:])
    assert all(not np.any(g) for g in before)
    assert max_diff(after, want) < PARITY


def _variables(artifact: bytes) -> int:
    """How many resource variables the artifact holds (its VarHandle ops' names)."""
    tree = schema.ModelT.InitFromPackedBuf(artifact, 0)
    codes = [code.builtinCode for code in tree.operatorCodes]
    return len(
        {
            op.builtinOptions.sharedName
            for graph in tree.subgraphs
            for op in graph.operators
            if codes[op.opcodeIndex] == schema.BuiltinOperator.VAR_HANDLE
        }
    )


def test_an_artifact_built_without_scaffold_has_none_of_it(
    training_cases: Cases, scaffold_cases: Cases
) -> None:
    # Prepare: the Adam MLP (6 weights, all trained) built both ways
    plain, scaffold = training_cases["mlp-tanh-adam"], scaffold_cases["mlp-tanh-adam"]

    # Execute
    keys = [
        set(Device(case.artifact).interpreter.get_signature_list()) for case in (plain, scaffold)
    ]
    counts = [_variables(case.artifact) for case in (plain, scaffold)]

    # Assert: without, the signatures and variables of before (weights, masks, Adam's m, v and
    # step, the learning rate); with, a correction and a sum per weight and a step count more
    assert keys == [{*SIGNATURES, SET_LR}, {*SIGNATURES, SET_LR, *SCAFFOLD_SIGNATURES}]
    assert counts == [6 * 4 + 2, 6 * 4 + 2 + 6 * 2 + 1]
