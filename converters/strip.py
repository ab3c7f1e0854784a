"""Load tf_keras model files and remove TF-MOT pruning wrappers before export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras

from fedprune.converters._errors import short_reason
from fedprune.protocol.errors import ConfigError

KERAS_SUFFIXES = (".keras", ".h5")


def strip(wrapped: tf_keras.Model) -> tf_keras.Model:
    """Return ``wrapped`` without pruning wrappers (the layers, and so the weights, are shared)."""
    return tfmot.sparsity.keras.strip_pruning(wrapped)


def load_keras(path: Path) -> tf_keras.Model:
    """Load a ``.keras`` or ``.h5`` model, wrapped or not, without compiling it.

    Raises:
        ConfigError: the file is missing, has another suffix or does not hold a tf_keras model.
    """
    path = Path(path)
    if path.suffix not in KERAS_SUFFIXES:
        raise ConfigError(f"{path}: not a Keras model file (expected a .keras or .h5 file)")
    if not path.is_file():
        raise ConfigError(f"{path}: not a Keras model file (no such file)")
    try:
        with tfmot.sparsity.keras.prune_scope():
            model = tf_keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises OSError, ValueError, KeyError, ... for bad files.
        raise ConfigError(f"{path}: not a Keras model file ({short_reason(exc)})") from exc
    if not isinstance(model, tf_keras.Model):
        raise ConfigError(f"{path}: not a Keras model file (holds a {type(model).__name__})")
    return model


def kernel_sparsity(model: tf_keras.Model) -> float:
    """Fraction of exact zeros among the kernels (weights of rank >= 2; biases excluded)."""
    kernels = [w for w in model.get_weights() if w.ndim >= 2]
    total = sum(w.size for w in kernels)
    return sum(int(np.count_nonzero(w == 0)) for w in kernels) / total if total else 0.0
