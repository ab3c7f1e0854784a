"""Convert a stripped tf_keras model to a TFLite flatbuffer (builtin ops only).

The model is traced as a ``tf.function`` with the model's own input signature (batch left dynamic)
and converted with ``from_concrete_functions``. ``TFLiteConverter.from_keras_model`` also works on
tf_keras models under TF 2.21, but it round-trips through a temporary SavedModel and silently falls
back to another pipeline when that save fails; the concrete-function route is direct and explicit.

Each :class:`~device_profiles.Precision` maps to one converter-configuring hook in ``_CONFIGURE``;
the sparse encoding is one more optimization added on top of any of them. Adding a precision means
adding one entry there.

Full int8 keeps a float32 input and output: the converter adds one quantize op in front and one
dequantize op behind, which cost microseconds, and in exchange every consumer (the LiteRT helpers,
``fedprune-infer``, a user's own code) feeds and reads the same floats as for every other precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tf_keras

from fedprune.converters._errors import short_reason
from fedprune.device_profiles import Precision
from fedprune.edge_client.errors import ConfigError, ExportError

CALIBRATION_SAMPLES = 200
"""At most this many calibration samples (a seeded random subset) feed full-int8 conversion."""

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
) -> bytes:
    """Convert a stripped, single-input tf_keras model to TFLite bytes.

    ``sparse`` adds ``EXPERIMENTAL_SPARSITY``, which stores sufficiently sparse weight tensors in
    TFLite's sparse format. ``calibration`` (samples shaped like the model's input) is required for
    full int8 and ignored otherwise.

    Raises:
        ConfigError: unknown precision, or full int8 without calibration samples.
        ExportError: the model has no known input signature or the converter fails.
    """
    configure = _CONFIGURE[parse_precision(precision)]
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
    if sparse:
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    try:
        return bytes(converter.convert())
    except Exception as exc:  # The converter raises ConverterError, ValueError, RuntimeError, ...
        raise ExportError(f"TFLite conversion failed: {short_reason(exc)}") from exc


def calibration_subset(x: np.ndarray, limit: int = CALIBRATION_SAMPLES) -> np.ndarray:
    """At most ``limit`` rows of ``x`` as float32, a seeded random subset so runs repeat exactly."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) <= limit:
        return x
    return x[np.sort(np.random.default_rng(0).choice(len(x), size=limit, replace=False))]


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
