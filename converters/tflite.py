"""Convert a stripped tf_keras model to a TFLite flatbuffer (builtin ops only).

The model is traced as a ``tf.function`` with the model's own input signature (batch left dynamic)
and converted with ``from_concrete_functions``. ``TFLiteConverter.from_keras_model`` also works on
tf_keras models under TF 2.21, but it round-trips through a temporary SavedModel and silently falls
back to another pipeline when that save fails; the concrete-function route is direct and explicit.

Each :class:`~device_profiles.Precision` maps to one converter-configuring hook in ``_CONFIGURE``;
the sparse encoding is one more optimization added on top of any of them. Adding a precision means
adding one entry there.

Full int8 keeps a float32 input and output by default: the converter adds one quantize op in front
and one dequantize op behind, which cost microseconds, and in exchange every consumer (the LiteRT
helpers, ``fedprune-infer``, a user's own code) feeds and reads the same floats as for every other
precision. ``int8_io`` drops those two ops for callers that already hold int8 data (a camera
pipeline, a microcontroller port); the input and output then carry their scale and zero point.

Calibration samples are chosen by content, not by position: the rows with the smallest SHA-256 of
their float32 bytes. A shuffled copy of the same data therefore calibrates on the same rows, in the
same order, and gives a byte-identical file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras

from fedprune.converters._errors import short_reason
from fedprune.device_profiles import Precision
from fedprune.protocol.errors import ConfigError, ExportError

CALIBRATION_SAMPLES = 200
"""At most this many calibration samples feed full-int8 conversion (:func:`calibration_subset`)."""
CALIBRATION_SHARE = 0.2
"""Share of the distinct held-out rows set aside for calibration when no other samples are given."""
CALIBRATION_RULE = "those with the smallest SHA-256 of their float32 bytes"
"""How calibration rows are chosen, as recorded in ``export.json``."""

_Configure = Callable[[tf.lite.TFLiteConverter, np.ndarray | None], None]


def _configure_float32(converter: tf.lite.TFLiteConverter, calibration: np.ndarray | None) -> None:
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]


def _configure_float16(converter: tf.lite.TFLiteConverter, calibration: np.ndarray | None) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def _configure_dynamic_int8(
    converter: tf.lite.TFLiteConverter, calibration: np.ndarray | None
) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _configure_full_int8(
    converter: tf.lite.TFLiteConverter, calibration: np.ndarray | None
) -> None:
    if calibration is None or len(calibration) == 0:
        raise ConfigError("full_int8 export needs calibration samples (none given)")
    samples = calibration

    def representative() -> Iterator[list[np.ndarray]]:
        for row in samples:
            yield [row[np.newaxis]]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    # INT8 only: an op without an int8 kernel fails the conversion, never silently stays float.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


_CONFIGURE: dict[Precision, _Configure] = {
    Precision.FLOAT32: _configure_float32,
    Precision.FLOAT16: _configure_float16,
    Precision.DYNAMIC_INT8: _configure_dynamic_int8,
    Precision.FULL_INT8: _configure_full_int8,
}


def parse_precision(value: Precision | str) -> Precision:
    """Return ``value`` as a :class:`Precision`, or raise ConfigError naming the accepted values."""
    try:
        return Precision(value)
    except ValueError:
        known = ", ".join(p.value for p in Precision)
        raise ConfigError(f"unknown precision {value!r} (supported: {known})") from None


def to_tflite(
    model: tf_keras.Model,
    *,
    precision: Precision | str = Precision.FLOAT32,
    sparse: bool = False,
    calibration: np.ndarray | None = None,
    int8_io: bool = False,
) -> bytes:
    """Convert a stripped, single-input tf_keras model to TFLite bytes.

    ``sparse`` adds ``EXPERIMENTAL_SPARSITY``, which stores sufficiently sparse weight tensors in
    TFLite's sparse format. ``calibration`` (samples shaped like the model's input) is required for
    full int8 and ignored otherwise; at most :data:`CALIBRATION_SAMPLES` of them are used, chosen
    by :func:`calibration_subset`. ``int8_io`` (full int8 only) makes the input and output int8.

    Raises:
        ConfigError: unknown precision, full int8 without calibration samples, or ``int8_io``
            with another precision.
        ExportError: the model has no known input signature or the converter fails.
    """
    chosen = parse_precision(precision)
    if int8_io and chosen is not Precision.FULL_INT8:
        raise ConfigError(f"int8 input and output need precision full_int8, not {chosen.value}")
    configure = _CONFIGURE[chosen]
    spec = _input_spec(model)
    samples = None if calibration is None else calibration_subset(calibration)
    try:

        def infer(x: tf.Tensor) -> tf.Tensor:
            return model(x, training=False)

        serve = tf.function(infer, input_signature=[spec])
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [serve.get_concrete_function()], model
        )
    except Exception as exc:  # Tracing raises ValueError, TypeError, ...
        raise ExportError(f"TFLite conversion failed: {short_reason(exc)}") from exc
    configure(converter, samples)
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    if sparse:
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    try:
        return bytes(converter.convert())
    except Exception as exc:  # The converter raises ConverterError, ValueError, RuntimeError, ...
        raise ExportError(f"TFLite conversion failed: {short_reason(exc)}") from exc


def calibration_subset(x: np.ndarray, limit: int = CALIBRATION_SAMPLES) -> np.ndarray:
    """At most ``limit`` distinct rows of ``x`` as float32: those with the smallest SHA-256 of
    their bytes, in that order. The choice depends on the rows' content only, so a shuffled copy
    of ``x`` gives the same rows in the same order."""
    x = np.asarray(x, dtype=np.float32)
    digests = row_digests(x)
    first: dict[bytes, int] = {}
    for index, digest in enumerate(digests):
        first.setdefault(digest, index)
    chosen = sorted(first)[:limit]
    return x[np.array([first[d] for d in chosen], dtype=np.int64)]


@dataclass(frozen=True)
class CalibrationSplit:
    """Held-out rows split into calibration samples and the rows the export is judged on.

    ``calibration`` holds distinct rows in :func:`calibration_subset` order; ``evaluate`` marks
    the rows of the original array that are none of them (a duplicate of a calibration row is
    left out too, so no calibration sample is ever scored).
    """

    calibration: np.ndarray
    evaluate: np.ndarray


def split_calibration(
    x: np.ndarray, *, limit: int = CALIBRATION_SAMPLES, share: float = CALIBRATION_SHARE
) -> CalibrationSplit:
    """Set ``share`` of the distinct rows of ``x`` (at least 1, at most ``limit``) aside for
    calibration, chosen as :func:`calibration_subset` does; every other row is for evaluation.

    Raises:
        ConfigError: fewer than two distinct rows, so nothing would be left to evaluate on.
    """
    x = np.asarray(x, dtype=np.float32)
    digests = row_digests(x)
    distinct = len(set(digests))
    if distinct < 2:
        raise ConfigError(
            f"full_int8 calibration needs at least 2 distinct held-out samples, got {distinct} "
            "(calibration and evaluation samples are kept apart; or give calibration samples)"
        )
    count = min(limit, max(1, int(distinct * share)))
    calibration = calibration_subset(x, count)
    chosen = set(row_digests(calibration))
    return CalibrationSplit(
        calibration=calibration, evaluate=np.array([d not in chosen for d in digests], dtype=bool)
    )


def row_digests(x: np.ndarray) -> list[bytes]:
    """SHA-256 of each row's float32 bytes (C order): the same values give the same digest
    whatever the array's dtype, shape per row or row order."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        return []
    rows = np.ascontiguousarray(x.reshape(len(x), -1))
    return [hashlib.sha256(row.tobytes()).digest() for row in rows]


def samples_sha256(x: np.ndarray) -> str:
    """One SHA-256 for a set of rows (of their sorted row digests), independent of row order."""
    return hashlib.sha256(b"".join(sorted(row_digests(x)))).hexdigest()


def sample_shape(model: tf_keras.Model) -> tuple[int, ...]:
    """The model's single input shape without the batch axis (every dimension known)."""
    shape = tuple(_input_spec(model).shape[1:])
    if any(dim is None for dim in shape):
        raise ExportError(f"model {model.name!r} has an input of unknown shape {list(shape)}")
    return tuple(int(dim) for dim in shape)


def _input_spec(model: tf_keras.Model) -> tf.TensorSpec:
    """The model's single input as a spec with a dynamic batch, traced with ``training=False``."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ExportError(f"model {model.name!r} has no input signature (build or call it first)")
    if len(inputs) != 1:
        raise ExportError(f"model {model.name!r} has {len(inputs)} inputs; only one is supported")
    return tf.TensorSpec([None, *inputs[0].shape[1:]], inputs[0].dtype, name="input")
