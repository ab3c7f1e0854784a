"""Pruning the global model with TF-MOT, one schedule step per round.

The model is wrapped with ``prune_low_magnitude``; its masks are the wrappers' own variables.
After a round's aggregate is written into the model, ``Pruner.step(round)`` sets every wrapper's
``pruning_step`` to the round number and runs TF-MOT's ``conditional_mask_update`` followed by its
``weight_mask_op``: exactly what a pruning training step does, with rounds as steps. Schedules use
``frequency=1`` in rounds, so the final sparsity is reached exactly at ``end_round``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
    PruneLowMagnitude,
)

from fedprune.coordinator.config import ScheduleConfig, ScheduleKind
from fedprune.edge_client.codec import Model
from fedprune.edge_client.errors import ConfigError

sparsity = tfmot.sparsity.keras
PruningSchedule = sparsity.PruningSchedule


def build_schedule(config: ScheduleConfig) -> Any:
    """The TF-MOT schedule for ``config``, with steps counted in rounds and ``frequency=1``."""
    if config.kind is ScheduleKind.POLYNOMIAL:
        return sparsity.PolynomialDecay(
            initial_sparsity=0.0,
            final_sparsity=config.target,
            begin_step=config.begin_round,
            end_step=config.end_round,
            frequency=1,
        )
    if config.kind is ScheduleKind.CONSTANT:
        return sparsity.ConstantSparsity(config.target, begin_step=config.begin_round, frequency=1)
    return MeanMagnitude(begin_step=config.begin_round, end_step=config.end_round)


class MeanMagnitude(PruningSchedule):  # type: ignore[misc,valid-type]
    """Sparsity = share of the layer's weights whose magnitude is below the layer's mean magnitude.

    TF-MOT schedules only see the step, so the pruner sets ``level`` from the layer's weights just
    before the mask update; TF-MOT's own top-k mask update then prunes exactly that share.
    """

    def __init__(self, begin_step: int, end_step: int) -> None:
        self.begin_step = begin_step
        self.end_step = end_step
        self.level = tf.Variable(0.0, trainable=False, dtype=tf.float32)

    def __call__(self, step: Any) -> tuple[Any, Any]:
        should = self._should_prune_in_step(step, self.begin_step, self.end_step, 1)
        return should, self.level

    def get_config(self) -> dict[str, Any]:
        return {
            "class_name": type(self).__name__,
            "config": {"begin_step": self.begin_step, "end_step": self.end_step},
        }


def pruner_for(model: tf_keras.Model, schedule: ScheduleConfig) -> Pruner:
    """Wrap ``model`` for ``schedule`` and return its pruner."""
    offset = schedule.begin_round - 1 if schedule.m_by_n else 0
    return Pruner(wrap(model, schedule), step_offset=offset)


def wrap(model: tf_keras.Model, schedule: ScheduleConfig) -> tf_keras.Model:
    """A pruning-wrapped copy of ``model`` (TF-MOT picks the prunable layers)."""
    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    try:
        return sparsity.prune_low_magnitude(
            copy, pruning_schedule=build_schedule(schedule), sparsity_m_by_n=schedule.m_by_n
        )
    except ValueError as exc:
        raise ConfigError(f"cannot prune this model: {exc}") from exc


class Pruner:
    """The global model: wrapped for TF-MOT, read through its stripped view and the masks."""

    def __init__(self, wrapped: tf_keras.Model, *, step_offset: int = 0) -> None:
        """``step_offset`` is subtracted from the round to give TF-MOT's step: m-by-n sparsity is
        applied at TF-MOT step 1, so a structured run passes ``begin_round - 1``."""
        self.wrapped = wrapped
        self.step_offset = step_offset
        self.stripped = sparsity.strip_pruning(wrapped)  # shares the inner layers with ``wrapped``
        self.wrappers = [layer for layer in wrapped.layers if isinstance(layer, PruneLowMagnitude)]
        position = {id(v): i for i, v in enumerate(self.stripped.weights)}
        self._mask_of: dict[int, Any] = {}
        for wrapper in self.wrappers:
            for weight, mask, _ in wrapper.pruning_vars:
                self._mask_of[position[id(weight)]] = mask
        self.step(self.step_offset - 1, update_masks=False)

    def model(self) -> Model:
        weights = [np.asarray(w, np.float32) for w in self.stripped.get_weights()]
        masks: list[np.ndarray | None] = [None] * len(weights)
        for i, mask in self._mask_of.items():
            masks[i] = np.asarray(mask.numpy(), np.float32)
        return Model(weights=weights, masks=masks)

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.stripped.set_weights(weights)

    def step(self, round_: int, *, update_masks: bool = True) -> None:
        """Advance every wrapper's schedule to ``round_`` and apply TF-MOT's mask update."""
        for wrapper in self.wrappers:
            wrapper.pruning_step.assign(round_ - self.step_offset)
            if not update_masks:
                continue
            # TF-MOT ranks the raw weights: zero the pruned ones first so that whatever was written
            # there cannot win a place in the new mask, and keep only positions the old mask kept.
            wrapper.pruning_obj.weight_mask_op()
            previous = [mask.numpy() for _, mask, _ in wrapper.pruning_vars]
            schedule = wrapper.pruning_schedule
            if isinstance(schedule, MeanMagnitude) and wrapper.pruning_vars:
                weight = wrapper.pruning_vars[0][0]
                magnitude = tf.abs(weight)
                below = tf.reduce_mean(tf.cast(magnitude < tf.reduce_mean(magnitude), tf.float32))
                schedule.level.assign(below)
            wrapper.pruning_obj.conditional_mask_update()
            for (_, mask, _), old in zip(wrapper.pruning_vars, previous, strict=True):
                mask.assign(mask * old)
            wrapper.pruning_obj.weight_mask_op()

    def sparsity(self) -> float:
        """Share of zeros among the prunable weights (all masked tensors together)."""
        masks = [m for m in self.model().masks if m is not None]
        total = sum(m.size for m in masks)
        return float(sum(m.size - np.count_nonzero(m) for m in masks) / max(total, 1))
