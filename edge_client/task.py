"""What a run's model learns, and how it is scored: one place for every trainer and evaluator.

A ``classify`` model outputs class probabilities (a softmax) and learns sparse categorical
cross-entropy against integer labels; it is scored by accuracy. A ``reconstruct`` model (an
autoencoder) outputs as many values as its input has and learns the mean squared error against
the input itself; labels play no part in training. On a held-out set whose labels mark anomalies
(0 normal, anything else anomalous) it is scored by the ROC AUC of the reconstruction error, the
anomaly score of MLPerf Tiny's anomaly detection; without such labels only its MSE is reported.

numpy only: devices import this without TensorFlow. scikit-learn (for the AUC) is imported only
where anomaly labels are scored, which the coordinator and the converters do, never a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

CLIP = 1e-7
"""Probabilities are clipped to [CLIP, 1] before the log (tf_keras's epsilon)."""


class Task(StrEnum):
    CLASSIFY = "classify"
    RECONSTRUCT = "reconstruct"

    def targets(self, x: np.ndarray, y: np.ndarray, output: Sequence[int]) -> np.ndarray:
        """What the model learns to output for the samples ``x`` labelled ``y``: the labels
        (int64), or ``x`` itself shaped like one ``output`` per sample (float32)."""
        if self is Task.CLASSIFY:
            return np.asarray(y, np.int64).reshape(-1)
        return np.asarray(x, np.float32).reshape((len(x), *output))

    def evaluate(
        self, outputs: np.ndarray, x: np.ndarray, y: np.ndarray, *, anomalies: bool = False
    ) -> Evaluation:
        """The loss and score of the model's ``outputs`` for ``x`` labelled ``y``. With
        ``anomalies``, a reconstruction is also scored by the ROC AUC of its error against
        ``y != 0`` (when both kinds are present)."""
        if self is Task.CLASSIFY:
            labels = np.asarray(y, np.int64).reshape(-1)
            picked = np.clip(outputs[np.arange(len(labels)), labels], CLIP, 1.0)
            return Evaluation(
                loss=float(-np.mean(np.log(picked))),
                accuracy=float(np.mean(np.argmax(outputs, axis=-1) == labels)),
                n=len(labels),
            )
        error = errors(outputs, x)
        return Evaluation(
            loss=float(np.mean(error)),
            n=len(error),
            auc=auc(error, y) if anomalies else None,
        )


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    loss: float  # cross-entropy, or the mean squared error of a reconstruction
    n: int
    accuracy: float | None = None  # a classifier's
    recall: list[float] | None = None  # per class (the coordinator's held-out set)
    auc: float | None = None  # a reconstruction's, on anomaly labels (Task.evaluate)

    @property
    def score(self) -> float | None:
        """Higher is better, chance is known: the accuracy, or the AUC (``None``: neither)."""
        return self.accuracy if self.accuracy is not None else self.auc

    @property
    def metric(self) -> str:
        """What ``score`` is: ``accuracy`` or ``AUC``."""
        return "AUC" if self.accuracy is None and self.auc is not None else "accuracy"

    def describe(self) -> str:
        """``accuracy 0.912``, ``AUC 0.950, MSE 0.0492`` or ``MSE 0.0492``."""
        if self.accuracy is not None:
            return f"accuracy {self.accuracy:.3f}"
        return ("" if self.auc is None else f"AUC {self.auc:.3f}, ") + f"MSE {self.loss:.4g}"


def errors(outputs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Each sample's mean squared reconstruction error."""
    out = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
    error: np.ndarray = np.mean((out - np.asarray(x, np.float64).reshape(len(x), -1)) ** 2, axis=1)
    return error


def auc(error: np.ndarray, y: np.ndarray) -> float | None:
    """The ROC AUC of ``error`` as the score of being anomalous (``y != 0``); ``None`` unless
    both normal and anomalous samples are there. A diverged model's NaN errors rank above every
    other, tied (all NaN: one half, chance)."""
    anomalous = np.asarray(y).reshape(-1) != 0
    if anomalous.all() or not anomalous.any():
        return None
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    ranks = rankdata(np.where(np.isnan(error), np.inf, error))  # the AUC depends on ranks only
    return float(roc_auc_score(anomalous, ranks))
