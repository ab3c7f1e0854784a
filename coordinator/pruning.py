"""Pruning the global model with TF-MOT, one schedule step per round.

The model is wrapped with ``prune_low_magnitude``; its masks are the wrappers' own variables.
After a round's aggregate is written into the model, ``Pruner.step(round)`` sets every wrapper's
``pruning_step`` to the round number and runs TF-MOT's ``conditional_mask_update`` followed by its
``weight_mask_op``: exactly what a pruning training step does, with rounds as steps. Schedules use
``frequency=1`` in rounds, so the final sparsity is reached exactly at ``end_round``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
    PruneLowMagnitude,
)

from fedprune.coordinator import structure
from fedprune.coordinator.config import ScheduleConfig, ScheduleKind
from fedprune.coordinator.global_model import Cutter
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ConfigError

sparsity = tfmot.sparsity.keras
PruningSchedule = sparsity.PruningSchedule

log = logging.getLogger("fedprune.coordinator")


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
    if schedule.units:
        structure.check(model)
    return Pruner(model, schedule)


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
    """The global model: wrapped for TF-MOT, read through its stripped view and the masks.

    With unit pruning (``schedule.units``) the schedule gives each round the share of every
    family's original groups of coupled channels to remove (:class:`structure.Coupling`; in a
    chain of layers a family is one layer, a group one of its units); the pruner ranks them by
    norm, writes their units into the wrappers' masks and holds what they give at zero
    (:meth:`structure.Coupling.silence`). :meth:`rebuild` then replaces the model by a smaller
    one without them (a hybrid schedule goes on with TF-MOT's own weight pruning inside the
    remaining units)."""

    def __init__(self, model: tf_keras.Model, schedule: ScheduleConfig) -> None:
        self.schedule = schedule
        # m-by-n sparsity is applied at TF-MOT step 1: a structured run counts from begin_round
        self.step_offset = schedule.begin_round - 1 if schedule.m_by_n else 0
        self.units: dict[str, int] = {}
        # What cuts arrays laid out as the weights before the last rebuild to the model after it
        # (the server optimizer's state: global_model.Cutter).
        self.cut: Cutter | None = None
        self.weight_phase = False  # a hybrid schedule wraps for its weights once units are done
        self._adopt(wrap(model, schedule), round_=self.step_offset - 1)
        if self.coupling is not None:  # family -> its groups at the start: the schedule's share
            self.units = {name: g.size for name, g in self.coupling.families.items()}

    def _adopt(self, wrapped: tf_keras.Model, round_: int) -> None:
        self.wrapped = wrapped
        self.stripped = sparsity.strip_pruning(wrapped)  # shares the inner layers with ``wrapped``
        self.wrappers = [layer for layer in wrapped.layers if isinstance(layer, PruneLowMagnitude)]
        self.coupling = structure.Coupling(self.stripped) if self.schedule.units else None
        position = {id(v): i for i, v in enumerate(self.stripped.weights)}
        norms = [
            layer
            for layer in self.stripped.submodules
            if isinstance(layer, tf_keras.layers.BatchNormalization)
        ]
        self._variances = [position[id(layer.moving_variance)] for layer in norms]
        self._statistics = frozenset(
            position[id(v)] for layer in norms for v in (layer.moving_mean, layer.moving_variance)
        )
        self._mask_of: dict[int, Any] = {}
        for wrapper in self.wrappers:
            for weight, mask, _ in wrapper.pruning_vars:
                self._mask_of[position[id(weight)]] = mask
        self.step(round_, update_masks=False)

    def model(self) -> Model:
        weights = [np.asarray(w, np.float32) for w in self.stripped.get_weights()]
        masks: list[np.ndarray | None] = [None] * len(weights)
        for i, mask in self._mask_of.items():
            masks[i] = np.asarray(mask.numpy(), np.float32)
        return Model(weights=weights, masks=masks, exact=self._statistics)

    def set_weights(self, weights: list[np.ndarray]) -> None:
        """Set the global model's weights; a BatchNormalization's moving variance below zero is
        set to zero. The devices' updates can sum to one (a lossy codec's rounding, a hostile
        device on purpose), and the square root of a negative variance would make every output
        of the model NaN from then on."""
        weights = list(weights)
        for i in self._variances:
            negative = int(np.sum(weights[i] < 0))
            if negative:
                log.warning(
                    "%d moving variance(s) of weight %d below zero after aggregation: set to 0",
                    negative,
                    i,
                )
                weights[i] = np.maximum(weights[i], 0.0)
        self.stripped.set_weights(weights)

    def step(self, round_: int, *, update_masks: bool = True) -> None:
        """Advance every wrapper's schedule to ``round_`` and apply its mask update."""
        for wrapper in self.wrappers:
            wrapper.pruning_step.assign(round_ - self.step_offset)
        if not update_masks:
            return
        if self.units and (round_ <= self.schedule.units_end or not self.schedule.weight_target):
            self._unit_step()  # a schedule's share is of units, never of the weights left
            return
        for wrapper in self.wrappers:
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

    def _unit_step(self) -> None:
        """Remove the groups of least norm in each family, down to the schedule's share of its
        original groups (the mean rule: those below the family's mean group norm)."""
        assert self.coupling is not None
        order = 1 if self.schedule.units == "l1" else 2
        wrapper_of = {w.layer.name: w for w in self.wrappers}
        masks = {name: wrapper_of[name].pruning_vars[0][1] for name in self.coupling.units}
        kernels = {name: wrapper_of[name].pruning_vars[0][0].numpy() for name in masks}
        groups = self.coupling.alive({name: mask.numpy() for name, mask in masks.items()})
        norms = self.coupling.norms(
            {name: kernels[name] * masks[name].numpy() for name in masks}, order
        )
        for family, members in self.coupling.families.items():
            if family not in self.units:  # a family that a rebuild made: counted from here
                log.warning("unit pruning meets a new family of channels, %s", family)
                self.units[family] = members.size
            wrapper = wrapper_of[family.split("+")[0]]
            should, level = wrapper.pruning_schedule(wrapper.pruning_step)
            if not bool(should):
                continue
            kept, scores = groups[members], norms[members]
            if isinstance(wrapper.pruning_schedule, MeanMagnitude):
                # the mean over the family's original groups (removed ones count as zero), so
                # that rebuilding in between changes nothing
                kept &= scores >= scores.sum() / self.units[family]
            else:
                excess = int(kept.sum()) - max(1, round((1 - float(level)) * self.units[family]))
                if excess > 0:  # the kept groups of least norm
                    kept[np.argsort(np.where(kept, scores, np.inf), kind="stable")[:excess]] = False
            if not kept.any():
                kept[int(np.argmax(scores))] = True  # a family keeps at least one group
            groups[members] = kept
        for name, mask in masks.items():
            units = self.coupling.producer_kept(name, groups)
            mask.assign(np.broadcast_to(units, mask.shape).astype(np.float32))
        self.coupling.silence(groups)
        for wrapper in self.wrappers:
            wrapper.pruning_obj.weight_mask_op()

    def rebuild_due(self, round_: int) -> bool:
        """Whether the schedule rebuilds the model after ``round_``: when the units are done,
        and every ``rebuild_every`` rounds while they are pruned."""
        s = self.schedule
        if not self.units or not s.begin_round <= round_ <= s.units_end:
            return False
        every = s.rebuild_every
        return round_ == s.units_end or (every > 0 and (round_ - s.begin_round) % every == 0)

    def rebuild(self) -> bool:
        """Replace the model by a smaller one without its removed units (same outputs); ``False``
        when there is nothing to remove. From the round the units are done a hybrid schedule
        prunes weights inside the remaining units (whether or not anything was removed)."""
        if self.coupling is None:
            return False  # weight pruning: nothing to rebuild
        round_ = int(self.wrappers[0].pruning_step.numpy()) + self.step_offset
        masks = {
            w.layer.name: w.pruning_vars[0][1].numpy() for w in self.wrappers if w.pruning_vars
        }
        keep = {name: structure.alive(masks[name]) for name in self.coupling.producers}
        small, small_masks, cut = self.stripped, masks, None
        if not all(units.all() for units in keep.values()):
            small, small_masks, cut = structure.rebuild(self.stripped, masks, keep)
        smaller = bool(small.count_params() < self.stripped.count_params())
        self.cut = cut if smaller else None
        if smaller or self._weight_phase(round_) != self.weight_phase:
            self.adopt(small, round_, small_masks)
        return smaller

    def adopt(
        self, model: tf_keras.Model, round_: int, masks: dict[str, np.ndarray] | None = None
    ) -> None:
        """Continue with ``model`` (a rebuilt one, or a checkpoint's architecture) at ``round_``,
        wrapped for the schedule of that round, with its kernel ``masks`` by layer name."""
        schedule = self.schedule
        self.weight_phase = self._weight_phase(round_)
        if self.weight_phase:
            schedule = ScheduleConfig(
                target=schedule.weight_target,
                begin_round=schedule.units_end,
                end_round=schedule.last_round,
            )
        self._adopt(wrap(model, schedule), round_)
        for wrapper in self.wrappers:
            if masks is not None and wrapper.layer.name in masks and wrapper.pruning_vars:
                wrapper.pruning_vars[0][1].assign(masks[wrapper.layer.name])

    def architecture(self) -> str:
        """The model's architecture as JSON (what a checkpoint keeps: a rebuild changes it)."""
        return str(self.stripped.to_json())

    def input_shape(self) -> list[int]:
        """The shape of one input sample (without the batch dimension)."""
        return [int(d) for d in self.stripped.input_shape[1:]]

    def load_architecture(self, model_json: str, round_: int) -> None:
        """Continue with a checkpoint's architecture at ``round_``, wrapped for that round's
        schedule (its weights come next)."""
        if model_json != self.architecture():
            self.adopt(tf_keras.models.model_from_json(model_json), round_)
        elif self._weight_phase(round_) != self.weight_phase:
            self.adopt(self.stripped, round_)

    def _weight_phase(self, round_: int) -> bool:
        """Whether a hybrid schedule prunes weights at ``round_`` (its units are done)."""
        return bool(
            self.units and self.schedule.weight_target and round_ >= self.schedule.units_end
        )

    def parameters(self) -> int:
        """Parameters of the model as it is now (fewer once a unit-pruned model is rebuilt)."""
        return int(self.stripped.count_params())

    def sparsity(self) -> float:
        """Share of zeros among the prunable weights (all masked tensors together)."""
        masks = [m for m in self.model().masks if m is not None]
        total = sum(m.size for m in masks)
        return float(sum(m.size - np.count_nonzero(m) for m in masks) / max(total, 1))
