"""Run TFLite models the way a device does: the ai-edge-litert interpreter, no TensorFlow.

A model is opened in LiteRT's default interpreter, the one a user's own
``Interpreter(model_path=...)`` gets: builtin kernels plus the default XNNPACK delegate, which is
applied when the tensors are first allocated. Exports are verified in exactly that setup
(:data:`Runtime.DEFAULT`), so every export runs there. A file XNNPACK fails to prepare (a
sparse-format int8 model exported before that rule) still opens on the device: :func:`open_model`
then falls back to the builtin kernels alone (:data:`Runtime.BUILTIN`) and says so.

Integer-input models (full int8 with int8 I/O) get their float input quantized with the tensor's
own scale, and integer outputs are dequantized, so callers always feed and read floats.

Latency is measured as runs of back-to-back invocations timed as blocks, after a warm-up by count
and by time: at microsecond scale a single ``invoke`` is dominated by timer and scheduler noise,
while the mean of a block of them is not.
"""

from __future__ import annotations

import enum
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from fedprune.protocol.errors import ModelError

BATCH_SIZE = 256

LATENCY_RUNS = 30
"""Timed runs (blocks of back-to-back invocations) per latency measurement."""
WARMUP_INVOKES = 10
"""At least this many untimed invocations before timing..."""
WARMUP_SECONDS = 0.05
"""...and at least this long (first invocations pack weights and fault pages in)."""
RUN_SECONDS = 0.005
"""Each timed run lasts about this long: long enough that timer resolution and one stray
scheduler hiccup do not dominate the block's mean."""
MAX_INVOKES_PER_RUN = 100_000


class Runtime(enum.StrEnum):
    """The LiteRT setup a model runs in; the value is what ``export.json`` and reports say."""

    DEFAULT = "default interpreter (XNNPACK)"
    BUILTIN = "builtin kernels (no delegates)"


_RESOLVER = {
    Runtime.DEFAULT: OpResolverType.AUTO,
    Runtime.BUILTIN: OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
}


@dataclass(frozen=True)
class Loaded:
    """An interpreter with its tensors allocated, and the runtime it was opened in.

    ``fallback`` is why the default interpreter was not used (its own error), or ``None``.
    """

    interpreter: Interpreter
    runtime: Runtime
    fallback: str | None = None

    def describe(self) -> str:
        """The runtime, and why it is not the default one when it fell back."""
        if self.fallback is None:
            return self.runtime.value
        return f"{self.runtime.value}; the default interpreter failed: {self.fallback}"


@dataclass(frozen=True, kw_only=True)
class TensorFormat:
    """A model input or output: dtype, per-sample shape (batch axis left out) and, for integer
    tensors, the quantization that maps them to real values: ``real = (q - zero_point) * scale``."""

    dtype: str
    shape: tuple[int, ...]
    scale: float | None = None
    zero_point: int | None = None

    @classmethod
    def of(cls, detail: dict[str, Any]) -> TensorFormat:
        """The format of one entry of ``get_input_details()`` or ``get_output_details()``."""
        dtype = np.dtype(detail["dtype"])
        scale, zero_point = detail["quantization"]
        quantized = np.issubdtype(dtype, np.integer) and float(scale) != 0.0
        return cls(
            dtype=dtype.name,
            shape=tuple(int(d) for d in detail["shape"][1:]),
            scale=float(scale) if quantized else None,
            zero_point=int(zero_point) if quantized else None,
        )

    def describe(self) -> str:
        text = f"{self.dtype} (N, {', '.join(map(str, self.shape))})"
        if self.scale is not None:
            text += f", scale {self.scale:.6g} zero point {self.zero_point}"
        return text

    def to_json(self) -> dict[str, Any]:
        """dtype and shape; scale and zero_point only for a quantized tensor."""
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.scale is not None:
            out |= {"scale": self.scale, "zero_point": self.zero_point}
        return out


@dataclass(frozen=True, kw_only=True)
class Latency:
    """Wall time of one single-sample ``invoke``, in milliseconds.

    Each of ``runs`` timed runs is a block of ``invokes_per_run`` back-to-back invocations; its
    mean is one measurement. ``p50_ms`` and ``p95_ms`` are the median and 95th percentile of those
    means, ``iqr_ms`` their 25th and 75th percentiles (the spread). Timing started after
    ``warmup_invokes`` untimed invocations.
    """

    p50_ms: float
    p95_ms: float
    iqr_ms: tuple[float, float]
    runs: int
    invokes_per_run: int
    warmup_invokes: int


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"(?<=\S)(?=Node number )", "; ", text)  # LiteRT glues two messages together
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def open_model(
    model: bytes | Path, *, num_threads: int = 1, runtime: Runtime | None = None
) -> Loaded:
    """Open a model's bytes or file in LiteRT and allocate its tensors.

    ``runtime=None`` (what a device uses) opens it in the default interpreter and falls back to
    builtin kernels only when that fails to prepare the model. A given ``runtime`` is used alone:
    the exporter verifies with ``Runtime.DEFAULT`` so that a file it writes runs there.

    Raises:
        ModelError: the file cannot be read, is not a model, or no runtime asked for can prepare it.
    """
    content = _read(model)
    if runtime is not None:
        return Loaded(_prepared(content, num_threads, runtime), runtime)
    try:
        return Loaded(_prepared(content, num_threads, Runtime.DEFAULT), Runtime.DEFAULT)
    except _PrepareError as failed:
        interpreter = _prepared(content, num_threads, Runtime.BUILTIN)
        return Loaded(interpreter, Runtime.BUILTIN, failed.reason)


def load_interpreter(
    model: bytes | Path, *, num_threads: int = 1, runtime: Runtime | None = None
) -> Interpreter:
    """The interpreter of :func:`open_model`, for callers that do not need to know the runtime."""
    return open_model(model, num_threads=num_threads, runtime=runtime).interpreter


class _PrepareError(ModelError):
    """The interpreter loaded the model but could not prepare (allocate) it; ``reason`` is
    LiteRT's own message."""

    reason = ""


def _prepare_error(runtime: Runtime, reason: str) -> _PrepareError:
    who = "LiteRT" if runtime is Runtime.BUILTIN else f"LiteRT's {runtime.value}"
    error = _PrepareError(f"{who} cannot prepare the model: {reason}")
    error.reason = reason
    return error


def _read(model: bytes | Path) -> bytes:
    if not isinstance(model, Path):
        return model
    try:
        return model.read_bytes()
    except OSError as exc:
        raise ModelError(f"{model}: cannot read the model ({exc.strerror or exc})") from exc


def _prepared(content: bytes, num_threads: int, runtime: Runtime) -> Interpreter:
    """A new interpreter in ``runtime`` with its tensors allocated (delegates apply here)."""
    try:
        interpreter = Interpreter(
            model_content=content,
            num_threads=num_threads,
            experimental_op_resolver_type=_RESOLVER[runtime],
        )
    except Exception as exc:  # LiteRT raises ValueError for bytes that are not a flatbuffer
        raise ModelError(f"LiteRT cannot load the model: {_reason(exc)}") from exc
    try:
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise _prepare_error(runtime, _reason(exc)) from exc
    return interpreter


def input_shape(interpreter: Interpreter) -> tuple[int, ...]:
    """The model's input shape without the batch axis."""
    return tuple(int(d) for d in interpreter.get_input_details()[0]["shape"][1:])


def io_formats(interpreter: Interpreter) -> tuple[TensorFormat, TensorFormat]:
    """The formats of the model's (first) input and output."""
    return (
        TensorFormat.of(interpreter.get_input_details()[0]),
        TensorFormat.of(interpreter.get_output_details()[0]),
    )


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


def measure_latency(
    interpreter: Interpreter,
    sample: np.ndarray,
    *,
    runs: int = LATENCY_RUNS,
    warmup: int = WARMUP_INVOKES,
    warmup_s: float = WARMUP_SECONDS,
    run_s: float = RUN_SECONDS,
) -> Latency:
    """Time single-sample inference of ``sample`` in ``interpreter`` (see :class:`Latency`).

    Warm-up lasts at least ``warmup`` invocations and ``warmup_s`` seconds; the mean invocation
    time over its second half sizes each run to about ``run_s`` seconds (at least one
    invocation); then ``runs`` runs are timed.
    """
    inp = interpreter.get_input_details()[0]
    batch = _to_input(_reshape(np.asarray(sample)[np.newaxis], input_shape(interpreter)), inp)
    try:
        interpreter.resize_tensor_input(inp["index"], batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], batch)
        first, _ = _invoke_for(interpreter, max(1, math.ceil(warmup / 2)), warmup_s / 2)
        second, seconds = _invoke_for(interpreter, max(1, math.ceil(warmup / 2)), warmup_s / 2)
        estimate = max(seconds / second, 1e-9)
        per_run = max(1, min(MAX_INVOKES_PER_RUN, math.ceil(run_s / estimate)))
        means = np.array([_mean_invoke_ms(interpreter, per_run) for _ in range(max(1, runs))])
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"LiteRT inference failed: {_reason(exc)}") from exc
    p25, p50, p75, p95 = (float(v) for v in np.percentile(means, [25, 50, 75, 95]))
    return Latency(
        p50_ms=p50,
        p95_ms=p95,
        iqr_ms=(p25, p75),
        runs=len(means),
        invokes_per_run=per_run,
        warmup_invokes=first + second,
    )


def _invoke_for(interpreter: Interpreter, count: int, seconds: float) -> tuple[int, float]:
    """Invoke until both ``count`` invocations and ``seconds`` have passed; how many were run,
    and in how many seconds."""
    done = 0
    start = now = time.perf_counter()
    while done < count or now - start < seconds:
        interpreter.invoke()
        done += 1
        now = time.perf_counter()
    return done, now - start


def _mean_invoke_ms(interpreter: Interpreter, count: int) -> float:
    """Mean wall time in milliseconds of ``count`` back-to-back invocations, timed as one block."""
    invoke = interpreter.invoke
    start = time.perf_counter()
    for _ in range(count):
        invoke()
    return (time.perf_counter() - start) * 1000.0 / count


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
