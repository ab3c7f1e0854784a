"""What a model learns and how it is scored, without TensorFlow (edge_client/task.py).

Devices never score anomalies, and their packages hold no scikit-learn or SciPy (the emulated
arm64 userland runs this file without them): the tests of the AUC skip there."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.edge_client.task import Evaluation, Task, auc


def test_a_classifier_learns_its_labels_and_is_scored_by_accuracy_and_cross_entropy() -> None:
    # Prepare: 40 rows of probabilities over 3 classes
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=40).astype(np.float32)
    y = rng.integers(0, 3, 40)
    x = rng.random((40, 4, 4, 1), dtype=np.float32)

    # Execute
    targets = Task.CLASSIFY.targets(x, y, (3,))
    evaluation = Task.CLASSIFY.evaluate(probs, x, y, anomalies=True)

    # Assert
    assert targets.dtype == np.int64 and np.array_equal(targets, y)
    assert evaluation.accuracy == pytest.approx(np.mean(np.argmax(probs, axis=1) == y))
    cross_entropy = -np.mean(np.log(probs[np.arange(40), y]))
    assert evaluation.loss == pytest.approx(cross_entropy, rel=1e-5)
    assert (evaluation.auc, evaluation.n, evaluation.score) == (None, 40, evaluation.accuracy)
    assert evaluation.describe() == f"accuracy {evaluation.accuracy:.3f}"


def test_a_reconstruction_learns_its_input_and_is_scored_by_mse_and_the_auc_of_its_error() -> None:
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    # Prepare: 8x8 inputs reconstructed flat; the anomalies (y != 0) reconstructed worse
    rng = np.random.default_rng(1)
    x = rng.random((60, 8, 8, 1), dtype=np.float32)
    y = np.repeat([0, 0, 3], 20)  # any non-zero label marks an anomaly
    noise = rng.normal(0, 0.05, (60, 64)) * np.where(y != 0, 4.0, 1.0)[:, None]
    outputs = (x.reshape(60, 64) + noise).astype(np.float32)

    # Execute
    targets = Task.RECONSTRUCT.targets(x, y, (64,))
    scored = Task.RECONSTRUCT.evaluate(outputs, x, y, anomalies=True)
    on_device = Task.RECONSTRUCT.evaluate(outputs, x, y)

    # Assert: the input is the target, in the output's shape; the labels play no part in it
    assert targets.dtype == np.float32 and np.array_equal(targets, x.reshape(60, 64))
    errors = np.mean((outputs - x.reshape(60, 64)) ** 2, axis=1)
    assert scored.loss == pytest.approx(float(np.mean(errors)))
    assert scored.auc == pytest.approx(roc_auc_score(y != 0, errors)) and scored.auc > 0.9
    assert (scored.accuracy, scored.score) == (None, scored.auc)
    assert scored.describe() == f"AUC {scored.auc:.3f}, MSE {scored.loss:.4g}"
    assert (on_device.auc, on_device.score) == (None, None)  # a device never scores anomalies
    assert on_device.describe() == f"MSE {on_device.loss:.4g}"


@pytest.mark.parametrize(
    "labels", [[0, 0, 0, 0], [2, 1, 1, 5]], ids=["all-normal", "all-anomalous"]
)
def test_without_both_normal_and_anomalous_samples_there_is_no_auc(labels: list[int]) -> None:
    assert auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array(labels)) is None


def test_a_diverged_reconstruction_scores_as_chance_not_an_error() -> None:
    # NaN errors rank above every other, tied: all NaN is an AUC of one half
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    y = np.array([0, 1, 0, 1])

    assert auc(np.full(4, np.nan), y) == 0.5
    assert auc(np.array([0.1, np.nan, 0.2, 0.3]), y) == 1.0


def test_an_evaluation_without_held_out_samples_has_no_score() -> None:
    assert Evaluation(loss=0.0, n=0).score is None
