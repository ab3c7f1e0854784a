"""Measure exported models the way a device runs them: accuracy and latency under LiteRT.

The interpreter is created with ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` because the default XNNPACK
delegate fails to prepare sparse-format quantized models; builtin kernels run every format.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import tf_keras
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from converters._errors import short_reason
from edge_client.errors import ExportError

BATCH_SIZE = 256


def load_interpreter(model_bytes: bytes, *, num_threads: int = 1) -> Interpreter:
    """A LiteRT interpreter over ``model_bytes``, builtin kernels only, not yet allocated."""
    try:
        return Interpreter(
            model_content=model_bytes,
            num_threads=num_threads,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    except Exception as exc:  # LiteRT raises ValueError for bytes that are not a flatbuffer.
        raise ExportError(f"LiteRT cannot load the model: {short_reason(exc)}") from exc


def predict_tflite(
    model_bytes: bytes, x: np.ndarray, *, num_threads: int = 1, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Run ``x`` through the model in batches and return the stacked raw outputs."""
    interpreter = load_interpreter(model_bytes, num_threads=num_threads)
    inp = interpreter.get_input_details()[0]
    out_index = interpreter.get_output_details()[0]["index"]
    outputs: list[np.ndarray] = []
    shape: tuple[int, ...] = ()
    try:
        for start in range(0, len(x), batch_size):
            batch = _to_input(x[start : start + batch_size], inp)
            if batch.shape != shape:
                interpreter.resize_tensor_input(inp["index"], batch.shape)
                interpreter.allocate_tensors()
                shape = batch.shape
            interpreter.set_tensor(inp["index"], batch)
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(out_index).copy())
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"LiteRT inference failed: {short_reason(exc)}") from exc
    return np.concatenate(outputs)


def evaluate_tflite(
    model_bytes: bytes, x: np.ndarray, y: np.ndarray, *, num_threads: int = 1
) -> float:
    """Top-1 accuracy of a TFLite classifier on ``(x, y)`` under LiteRT."""
    return accuracy(predict_tflite(model_bytes, x, num_threads=num_threads), y)


def evaluate_keras(model: tf_keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a tf_keras classifier on ``(x, y)``."""
    return accuracy(model.predict(x, batch_size=BATCH_SIZE, verbose=0), y)


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose highest score is at the label's index."""
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(y).reshape(-1)))


def latency_ms(
    model_bytes: bytes, sample: np.ndarray, *, runs: int = 50, warmup: int = 5, num_threads: int = 1
) -> float:
    """Median wall time in milliseconds of one single-sample ``invoke`` (batch of one)."""
    interpreter = load_interpreter(model_bytes, num_threads=num_threads)
    inp = interpreter.get_input_details()[0]
    batch = _to_input(np.asarray(sample)[np.newaxis], inp)
    interpreter.resize_tensor_input(inp["index"], batch.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], batch)
    times: list[float] = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        interpreter.invoke()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _to_input(batch: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Cast (and for integer inputs, quantize) a float batch to the input tensor's dtype."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = (float(v) for v in detail["quantization"])
    if np.issubdtype(dtype, np.floating) or scale == 0.0:
        return np.ascontiguousarray(batch, dtype=dtype)
    info = np.iinfo(dtype)
    q = np.round(np.asarray(batch, np.float32) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)
