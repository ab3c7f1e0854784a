"""Measure exported models the way a device runs them: accuracy and latency under LiteRT.

The LiteRT side lives in ``edge_client.litert`` (devices run it without TensorFlow); this module
adds the Keras side and byte-level conveniences for the converters.
"""

from __future__ import annotations

import numpy as np
import tf_keras

from fedprune.edge_client.litert import (
    BATCH_SIZE,
    accuracy,
    latencies_ms,
    load_interpreter,
    predict,
)

__all__ = [
    "accuracy",
    "evaluate_keras",
    "evaluate_tflite",
    "latency_ms",
    "latency_percentiles_ms",
    "load_interpreter",
    "predict_tflite",
]


def predict_tflite(
    model_bytes: bytes, x: np.ndarray, *, num_threads: int = 1, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Run ``x`` through the model in batches and return the stacked outputs."""
    interpreter = load_interpreter(model_bytes, num_threads=num_threads)
    return predict(interpreter, x, batch_size=batch_size)


def evaluate_tflite(
    model_bytes: bytes, x: np.ndarray, y: np.ndarray, *, num_threads: int = 1
) -> float:
    """Top-1 accuracy of a TFLite classifier on ``(x, y)`` under LiteRT."""
    return accuracy(predict_tflite(model_bytes, x, num_threads=num_threads), y)


def evaluate_keras(model: tf_keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a tf_keras classifier on ``(x, y)``."""
    return accuracy(model.predict(x, batch_size=BATCH_SIZE, verbose=0), y)


def latency_percentiles_ms(
    model_bytes: bytes,
    sample: np.ndarray,
    *,
    num_threads: int = 1,
    runs: int = 100,
    warmup: int = 10,
) -> tuple[float, float]:
    """Median and 95th percentile wall time in milliseconds of one single-sample ``invoke``."""
    interpreter = load_interpreter(model_bytes, num_threads=num_threads)
    times = latencies_ms(interpreter, sample, runs=runs, warmup=warmup)
    p50, p95 = np.percentile(times, [50, 95])
    return float(p50), float(p95)


def latency_ms(
    model_bytes: bytes, sample: np.ndarray, *, runs: int = 50, warmup: int = 5, num_threads: int = 1
) -> float:
    """Median wall time in milliseconds of one single-sample ``invoke`` (batch of one)."""
    p50, _ = latency_percentiles_ms(
        model_bytes, sample, num_threads=num_threads, runs=runs, warmup=warmup
    )
    return p50
