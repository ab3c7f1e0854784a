"""Convert a stripped tf_keras model to a TFLite flatbuffer (builtin ops only).

The model is traced as a ``tf.function`` with the model's own input signature (batch left dynamic)
and converted with ``from_concrete_functions``. ``TFLiteConverter.from_keras_model`` also works on
tf_keras models under TF 2.21, but it round-trips through a temporary SavedModel and silently falls
back to another pipeline when that save fails; the concrete-function route is direct and explicit.

Each :class:`Precision` maps to one converter-configuring function in ``_CONFIGURE``; adding a
precision (float16, dynamic-range int8, full int8, sparse encoding) means adding one entry there.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import tensorflow as tf
import tf_keras

from converters._errors import short_reason
from edge_client.errors import ConfigError, ExportError


class Precision(enum.StrEnum):
    """Numeric format of the exported weights and activations."""

    FLOAT32 = "float32"


def _configure_float32(converter: tf.lite.TFLiteConverter) -> None:
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]


_CONFIGURE: dict[Precision, Callable[[tf.lite.TFLiteConverter], None]] = {
    Precision.FLOAT32: _configure_float32,
}


def parse_precision(value: Precision | str) -> Precision:
    """Return ``value`` as a :class:`Precision`, or raise ConfigError naming the accepted values."""
    try:
        return Precision(value)
    except ValueError:
        known = ", ".join(p.value for p in Precision)
        raise ConfigError(f"unknown precision {value!r} (supported: {known})") from None


def to_tflite(model: tf_keras.Model, *, precision: Precision | str = Precision.FLOAT32) -> bytes:
    """Convert a stripped, single-input tf_keras model to TFLite bytes.

    Raises:
        ConfigError: unknown precision.
        ExportError: the model has no known input signature or the converter fails.
    """
    configure = _CONFIGURE[parse_precision(precision)]
    spec = _input_spec(model)
    try:

        def infer(x: tf.Tensor) -> tf.Tensor:
            return model(x, training=False)

        serve = tf.function(infer, input_signature=[spec])
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [serve.get_concrete_function()], model
        )
        configure(converter)
        return bytes(converter.convert())
    except Exception as exc:  # Tracing and conversion raise ConverterError, ValueError, ...
        raise ExportError(f"TFLite conversion failed: {short_reason(exc)}") from exc


def _input_spec(model: tf_keras.Model) -> tf.TensorSpec:
    """The model's single input as a spec with a dynamic batch, traced with ``training=False``."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ExportError(f"model {model.name!r} has no input signature (build or call it first)")
    if len(inputs) != 1:
        raise ExportError(f"model {model.name!r} has {len(inputs)} inputs; only one is supported")
    return tf.TensorSpec([None, *inputs[0].shape[1:]], inputs[0].dtype, name="input")
