"""Keras models as the coordinator hands them on, for the converters' tests (TensorFlow).

A test helper, kept out of the installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow_model_optimization as tfmot
import tf_keras

from fedprune.converters.strip import strip

SPARSITY = 0.8


def pruned_then_stripped(build: Callable[[], tf_keras.Model]) -> Callable[[], tf_keras.Model]:
    """What the coordinator gives build_trainable: the model wrapped by TF-MOT, then stripped.
    The stripped model calls the same layer objects again, in a second graph."""

    def pruned_then_stripped() -> tf_keras.Model:
        schedule = tfmot.sparsity.keras.ConstantSparsity(SPARSITY, begin_step=0)
        return strip(tfmot.sparsity.keras.prune_low_magnitude(build(), pruning_schedule=schedule))

    return pruned_then_stripped
