"""Measure exported models the way a device runs them: accuracy and latency under LiteRT.

The LiteRT side lives in ``edge_client.litert`` (devices run it without TensorFlow); this module
adds the Keras side and byte-level conveniences for the converters. Every measurement here runs in
LiteRT's default interpreter (XNNPACK) unless told otherwise: that is the setup a user's own
``Interpreter(model_path=...)`` gets, so a file verified here runs there.
"""

from __future__ import annotations

import numpy as np
import tf_keras

from fedprune.edge_client.litert import (
    BATCH_SIZE,
    LATENCY_RUNS,
    WARMUP_INVOKES,
    Latency,
    Runtime,
    accuracy,
    load_interpreter,
    measure_latency,
    predict,
)

__all__ = [
    "accuracy",
    "evaluate_keras",
    "evaluate_tflite",
    "latency_ms",
    "latency_percentiles_ms",
    "load_interpreter",
    "model_latency",
    "predict_keras",
    "predict_tflite",
]


def predict_tflite(
    model_bytes: bytes,
    x: np.ndarray,
    *,
    num_threads: int = 1,
    batch_size: int = BATCH_SIZE,
    runtime: Runtime = Runtime.DEFAULT,
) -> np.ndarray:
    """Run ``x`` through the model in batches and return the stacked outputs."""
    interpreter = load_interpreter(model_bytes, num_threads=num_threads, runtime=runtime)
    return predict(interpreter, x, batch_size=batch_size)


def evaluate_tflite(
    model_bytes: bytes,
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_threads: int = 1,
    runtime: Runtime = Runtime.DEFAULT,
) -> float:
    """Top-1 accuracy of a TFLite classifier on ``(x, y)`` under LiteRT."""
    scores = predict_tflite(model_bytes, x, num_threads=num_threads, runtime=runtime)
    return accuracy(scores, y)


def predict_keras(model: tf_keras.Model, x: np.ndarray) -> np.ndarray:
    """The outputs of a tf_keras model for ``x``, in the batches LiteRT is run with."""
    return np.asarray(model.predict(x, batch_size=BATCH_SIZE, verbose=0))


def evaluate_keras(model: tf_keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a tf_keras classifier on ``(x, y)``."""
    return accuracy(predict_keras(model, x), y)


def model_latency(
    model_bytes: bytes,
    sample: np.ndarray,
    *,
    num_threads: int = 1,
    runtime: Runtime = Runtime.DEFAULT,
    runs: int = LATENCY_RUNS,
    warmup: int = WARMUP_INVOKES,
) -> Latency:
    """Single-sample latency of a model in a fresh interpreter (see ``edge_client.litert``)."""
    interpreter = load_interpreter(model_bytes, num_threads=num_threads, runtime=runtime)
    return measure_latency(interpreter, sample, runs=runs, warmup=warmup)


def latency_percentiles_ms(
    model_bytes: bytes,
    sample: np.ndarray,
    *,
    num_threads: int = 1,
    runs: int = LATENCY_RUNS,
    warmup: int = WARMUP_INVOKES,
) -> tuple[float, float]:
    """Median and 95th percentile in milliseconds of one single-sample ``invoke``, each over
    ``runs`` timed blocks of back-to-back invocations (:func:`model_latency`)."""
    measured = model_latency(model_bytes, sample, num_threads=num_threads, runs=runs, warmup=warmup)
    return measured.p50_ms, measured.p95_ms


def latency_ms(
    model_bytes: bytes,
    sample: np.ndarray,
    *,
    runs: int = LATENCY_RUNS,
    warmup: int = WARMUP_INVOKES,
    num_threads: int = 1,
) -> float:
    """Median wall time in milliseconds of one single-sample ``invoke`` (batch of one)."""
    measured = model_latency(model_bytes, sample, num_threads=num_threads, runs=runs, warmup=warmup)
    return measured.p50_ms
