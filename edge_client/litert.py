"""Run TFLite models the way a device does: the ai-edge-litert interpreter, no TensorFlow.

The interpreter is created with ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` because the default XNNPACK
delegate fails to prepare sparse-format quantized models; builtin kernels run every format.
Integer-input models (full int8) get their float input quantized with the tensor's own scale.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from fedprune.edge_client.errors import ModelError

BATCH_SIZE = 256


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def load_interpreter(model: bytes | Path, *, num_threads: int = 1) -> Interpreter:
    """A LiteRT interpreter over a model's bytes or file, builtin kernels only, not allocated."""
    content = model
    if isinstance(model, Path):
        try:
            content = model.read_bytes()
        except OSError as exc:
            raise ModelError(f"{model}: cannot read the model ({exc.strerror or exc})") from exc
    try:
        return Interpreter(
            model_content=content,
            num_threads=num_threads,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    except Exception as exc:  # LiteRT raises ValueError for bytes that are not a flatbuffer
        raise ModelError(f"LiteRT cannot load the model: {_reason(exc)}") from exc


def input_shape(interpreter: Interpreter) -> tuple[int, ...]:
    """The model's input shape without the batch axis."""
    return tuple(int(d) for d in interpreter.get_input_details()[0]["shape"][1:])


def predict(interpreter: Interpreter, x: np.ndarray, *, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Run ``x`` (reshaped to the model's input) in batches; the stacked float outputs."""
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    x = _reshape(x, input_shape(interpreter))
    if len(x) == 0:
        raise ModelError("no samples to run the model on")
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
            outputs.append(_from_output(interpreter.get_tensor(out["index"]), out))
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"LiteRT inference failed: {_reason(exc)}") from exc
    return np.concatenate(outputs)


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose highest score is at the label's index."""
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(y).reshape(-1)))


def latencies_ms(
    interpreter: Interpreter, sample: np.ndarray, *, runs: int = 50, warmup: int = 5
) -> np.ndarray:
    """Wall times in milliseconds of ``runs`` single-sample invocations (after ``warmup``)."""
    inp = interpreter.get_input_details()[0]
    batch = _to_input(_reshape(np.asarray(sample)[np.newaxis], input_shape(interpreter)), inp)
    times = []
    try:
        interpreter.resize_tensor_input(inp["index"], batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], batch)
        for i in range(warmup + runs):
            start = time.perf_counter()
            interpreter.invoke()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"LiteRT inference failed: {_reason(exc)}") from exc
    return np.array(times)


def _reshape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    try:
        return np.asarray(x).reshape((-1, *shape))
    except ValueError as exc:
        per_sample = int(np.prod(np.asarray(x).shape[1:]))
        raise ModelError(
            f"the data has {per_sample} values per sample; the model wants {list(shape)}"
        ) from exc


def _to_input(batch: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Cast (and for integer inputs, quantize) a float batch to the input tensor's dtype."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = (float(v) for v in detail["quantization"])
    if np.issubdtype(dtype, np.floating) or scale == 0.0:
        return np.ascontiguousarray(batch, dtype=dtype)
    info = np.iinfo(dtype)
    q = np.round(np.asarray(batch, np.float32) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def _from_output(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Dequantize an integer output tensor; float outputs pass through."""
    scale, zero_point = (float(v) for v in detail["quantization"])
    if np.issubdtype(values.dtype, np.floating) or scale == 0.0:
        return values.copy()
    return (values.astype(np.float32) - zero_point) * scale
