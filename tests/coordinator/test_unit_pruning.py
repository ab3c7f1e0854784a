"""Unit pruning: whole units and filters on a schedule, the rebuild, hybrid (pruning.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras
from round_harness import MLP_PARAMS, ROUND, Harness, make_harness, random_delta, update_payload

from fedprune.coordinator import models
from fedprune.coordinator.config import ScheduleConfig, ScheduleKind
from fedprune.coordinator.pruning import Pruner, pruner_for
from fedprune.coordinator.structure import alive, unit_norms
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import Round

X = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)


def _units(pruner: Pruner) -> dict[str, int]:
    """Units each unit layer keeps (in its mask; the layer's width after a rebuild)."""
    return {
        w.layer.name: int(alive(w.pruning_vars[0][1].numpy()).sum())
        for w in pruner.wrappers
        if w.layer.name in pruner.units
    }


def _perturb(pruner: Pruner, seed: int) -> None:
    """What a round's aggregate does: every weight moves a little, biases too."""
    rng = np.random.default_rng(seed)
    pruner.set_weights(
        [w + rng.normal(0, 0.01, w.shape).astype(np.float32) for w in pruner.stripped.get_weights()]
    )


def test_units_of_least_norm_go_on_the_polynomial_schedule() -> None:
    pruner = pruner_for(
        models.cnn(), ScheduleConfig(units="l1", target=0.75, begin_round=1, end_round=4)
    )
    conv, dense = pruner.units  # 16 filters, 128 units
    counts = []
    for round_ in range(1, 5):
        _perturb(pruner, round_)
        before = {
            name: unit_norms(pruner.stripped.get_layer(name).kernel.numpy(), 1)
            for name in pruner.units
        }
        alive_before = {
            w.layer.name: alive(w.pruning_vars[0][1].numpy())
            for w in pruner.wrappers
            if w.pruning_vars
        }

        pruner.step(round_)

        counts.append(_units(pruner))
        for wrapper in [w for w in pruner.wrappers if w.pruning_vars]:
            name = wrapper.layer.name
            if name not in pruner.units:
                assert wrapper.pruning_vars[0][1].numpy().all()  # the classes are never pruned
                continue
            units = alive(wrapper.pruning_vars[0][1].numpy())
            gone = alive_before[name] & ~units
            if gone.any():  # the newly removed had the least norm among the alive
                assert before[name][gone].max() <= before[name][units].min()
            kernel, bias = wrapper.layer.get_weights()
            assert not kernel[..., ~units].any() and not bias[~units].any()
    # TF-MOT's PolynomialDecay from 0 to 0.75 over rounds 1..4 (0, 0.528, 0.722, 0.75) of the
    # original units
    assert [c[conv] for c in counts] == [16, 8, 4, 4]
    assert [c[dense] for c in counts] == [128, 60, 36, 32]


def test_tfmot_block_sparsity_cannot_make_a_dense_unit_one_block() -> None:
    """Why the pruner writes unit masks itself: TF-MOT's block sparsity takes rank-2 kernels, but
    a block the height of the kernel pools it to one row, which TF-MOT squeezes to rank 1 and
    then refuses. If this test fails, TF-MOT learned it: use its block sparsity for Dense."""
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(
        models.mlp(),
        pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1),
        block_size=(64, 1),
        block_pooling_type="AVG",
    )
    wrapped.layers[0].pruning_step.assign(0)

    with pytest.raises(ValueError, match="rank 2"):
        wrapped.layers[0].pruning_obj.conditional_mask_update()


def test_rebuild_keeps_the_outputs_and_shrinks_the_model_and_its_masks() -> None:
    pruner = pruner_for(
        models.cnn(), ScheduleConfig(units="l2", target=0.75, begin_round=1, end_round=3)
    )
    for round_ in range(1, 4):
        _perturb(pruner, round_)
        pruner.step(round_)
    assert pruner.rebuild_due(3) and not pruner.rebuild_due(2)
    expected = pruner.stripped(X).numpy()
    before = pruner.parameters()

    assert pruner.rebuild()

    np.testing.assert_allclose(pruner.stripped(X).numpy(), expected, atol=2e-5)
    assert [w.shape for w in pruner.model().weights] == [
        (3, 3, 1, 4),
        (4,),
        (256, 32),
        (32,),
        (32, 10),
        (10,),
    ]
    assert all(m is None or m.all() for m in pruner.model().masks)
    assert pruner.parameters() < before / 10
    assert not pruner.rebuild()  # nothing left to remove
    pruner.step(4)  # the schedule is done: nothing more goes
    assert _units(pruner) == {name: n // 4 for name, n in pruner.units.items()}


def test_filters_before_batch_normalization_and_a_same_padded_conv_go_all_the_way() -> None:
    """Conv -> BN -> ReLU -> Conv (same): the pruner holds a removed filter's bias and its BN
    scale, shift and running mean at zero, so it gives zero and the rebuild removes it."""
    layers = tf_keras.layers
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            layers.Input((8, 8, 1)),
            layers.Conv2D(8, 3, padding="same"),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.Flatten(),
            layers.Dense(10, activation="softmax"),
        ]
    )
    norm = model.layers[1]
    norm.beta.assign(np.full(8, 0.3, np.float32))  # what training leaves: a nonzero shift
    norm.moving_mean.assign(np.full(8, -0.2, np.float32))
    pruner = pruner_for(
        model, ScheduleConfig(units="l1", kind=ScheduleKind.CONSTANT, target=0.5, begin_round=1)
    )
    pruner.step(1)
    expected = pruner.stripped(X).numpy()

    assert pruner.rebuild()

    convolutions = [la for la in pruner.stripped.layers if isinstance(la, tf_keras.layers.Conv2D)]
    assert [la.filters for la in convolutions] == [4, 4]
    np.testing.assert_allclose(pruner.stripped(X).numpy(), expected, atol=2e-5)


def test_rebuilding_every_round_reaches_the_same_widths() -> None:
    schedule = ScheduleConfig(units="l1", target=0.75, begin_round=1, end_round=4, rebuild_every=1)
    pruner = pruner_for(models.cnn(), schedule)
    widths = []
    for round_ in range(1, 6):
        _perturb(pruner, round_)
        pruner.step(round_)
        if pruner.rebuild_due(round_):
            pruner.rebuild()
        widths.append([w.shape[-1] for w in pruner.model().weights[::2]])

    assert widths == [[16, 128, 10], [8, 60, 10], [4, 36, 10], [4, 32, 10], [4, 32, 10]]


def test_a_constant_unit_schedule_prunes_no_weights_after_its_rebuild() -> None:
    """TF-MOT's ConstantSparsity never ends: after the rebuild its share is of units, never of
    the small model's weights."""
    schedule = ScheduleConfig(units="l1", kind=ScheduleKind.CONSTANT, target=0.5, begin_round=2)
    pruner = pruner_for(models.cnn(), schedule)
    for round_ in range(1, 6):
        _perturb(pruner, round_)
        pruner.step(round_)
        if pruner.rebuild_due(round_):
            assert pruner.rebuild()

    assert [w.shape[-1] for w in pruner.model().weights[::2]] == [8, 64, 10]
    assert pruner.sparsity() == 0.0


def test_hybrid_prunes_weights_inside_the_remaining_units_after_the_rebuild() -> None:
    schedule = ScheduleConfig(
        units="l1", target=0.5, begin_round=1, end_round=3, weight_target=0.8, weight_end_round=6
    )
    pruner = pruner_for(models.cnn(), schedule)
    for round_ in range(1, 7):
        _perturb(pruner, round_)
        pruner.step(round_)
        if pruner.rebuild_due(round_):
            assert pruner.rebuild()
        if round_ == 3:
            assert pruner.sparsity() == 0.0  # rebuilt: every weight left is kept
    widths = [w.shape[-1] for w in pruner.model().weights[::2]]

    assert widths == [8, 64, 10]
    assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)


def test_hybrid_prunes_weights_even_when_its_last_unit_round_removes_nothing() -> None:
    """Rebuilt every round, the ramp to half the units is done by round 7 (round(0.5015 * 16) =
    8 filters, as at round 8): the rebuild at round 8 removes nothing and the weights must still
    be pruned from then on."""
    schedule = ScheduleConfig(
        units="l1",
        target=0.5,
        begin_round=1,
        end_round=8,
        rebuild_every=1,
        weight_target=0.8,
        weight_end_round=12,
    )
    pruner = pruner_for(models.cnn(), schedule)
    for round_ in range(1, 13):
        _perturb(pruner, round_)
        pruner.step(round_)
        if pruner.rebuild_due(round_):
            assert pruner.rebuild() == (1 < round_ < 8)  # none at round 1 (level 0) nor 8

    assert [w.shape[-1] for w in pruner.model().weights[::2]] == [8, 64, 10]
    assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)


def test_the_mean_rule_reaches_the_same_widths_whether_rebuilt_on_the_way_or_not() -> None:
    widths = []
    for every in (0, 1):
        schedule = ScheduleConfig(
            units="l1", kind=ScheduleKind.MEAN, begin_round=2, end_round=8, rebuild_every=every
        )
        pruner = pruner_for(models.build("cnn", seed=0), schedule)
        for round_ in range(1, 9):
            pruner.step(round_)
            if pruner.rebuild_due(round_):
                pruner.rebuild()
        widths.append([w.shape[-1] for w in pruner.model().weights[::2]])

    assert widths[0] == widths[1]
    assert widths[0][0] > 2 and widths[0][1] > 16


def test_mean_rule_at_unit_level_removes_units_below_the_mean_norm() -> None:
    pruner = pruner_for(
        models.mlp(), ScheduleConfig(units="l1", kind=ScheduleKind.MEAN, begin_round=1, end_round=2)
    )
    first = pruner.stripped.layers[0]
    norms = unit_norms(first.kernel.numpy(), 1)

    pruner.step(1)

    np.testing.assert_array_equal(
        alive(pruner.wrappers[0].pruning_vars[0][1].numpy()), norms >= norms.mean()
    )


def test_unit_pruning_refuses_a_model_it_cannot_rebuild() -> None:
    inputs = tf_keras.layers.Input((8, 8, 1))
    x = tf_keras.layers.Conv2DTranspose(4, 3)(inputs)
    x = tf_keras.layers.Flatten()(x)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(10, activation="softmax")(x))

    with pytest.raises(ConfigError, match="Conv2DTranspose"):
        pruner_for(model, ScheduleConfig(units="l1", begin_round=1, end_round=2))


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (tf_keras.layers.Conv2D(4, 3, groups=1, data_format="channels_first"), "channels_first"),
        (tf_keras.layers.Activation("softmax"), "softmax"),
        (tf_keras.layers.Dense(8, activation=tf.nn.softmax), "softmax"),
    ],
    ids=["channels-first", "softmax-activation", "tf-nn-softmax"],
)
def test_unit_pruning_refuses_a_model_with_nothing_it_can_cut(layer: Any, message: str) -> None:
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((8, 8, 4)),
            tf_keras.layers.Conv2D(4, 1),
            layer,
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(10, activation="softmax"),
        ]
    )

    with pytest.raises(ConfigError, match=message):
        pruner_for(model, ScheduleConfig(units="l1", begin_round=1, end_round=2))


def test_unit_pruning_refuses_a_grouped_convolution() -> None:
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((8, 8, 4)),
            tf_keras.layers.Conv2D(4, 3, groups=2),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(10, activation="softmax"),
        ]
    )

    with pytest.raises(ConfigError, match="grouped"):
        pruner_for(model, ScheduleConfig(units="l1", begin_round=1, end_round=2))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"units": "l3"}, "units must be l1 or l2"),
        ({"units": "l1", "structure": "2:4"}, "give one"),
        ({"rebuild_every": 2}, "go with unit pruning"),
        ({"units": "l1", "weight_target": 0.5, "weight_end_round": 12}, "must be after"),
        ({"units": "l1", "weight_end_round": 14}, "goes with weight_target"),
        ({"units": "l1", "kind": "constant", "weight_target": 0.5}, "give weight_end_round"),
    ],
)
def test_unit_schedule_options_are_checked(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ScheduleConfig(begin_round=2, end_round=12, **fields)  # type: ignore[arg-type]


def _pruned_mlp(schedule: ScheduleConfig) -> Pruner:
    """The mlp preset under ``schedule``, at its step 1 (what the round loop's harness runs)."""
    pruner = Pruner(models.build("mlp", seed=0), schedule)
    pruner.step(0)
    pruner.step(1)
    return pruner


@pytest.fixture
def harness() -> Callable[..., Harness]:
    return make_harness(_pruned_mlp)


def test_after_a_rebuild_a_late_update_of_the_old_model_is_refused_not_a_crash(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: half the units go at round 2 and the model is rebuilt; "b"'s round-2 update, on
    # the old model's shapes, arrives during round 3
    units = ScheduleConfig(units="l1", target=0.5, begin_round=1, end_round=2)
    h = harness(quorum=0.5, staleness_weight=0.5, schedule=units, rounds=3)
    sent: dict[str, object] = {}

    def answer(announcement: Round, model: Model) -> None:
        if announcement.round == ROUND:
            h.clients["a"].send(ROUND, update_payload(model, random_delta(model, 1)))
            sent["old"] = update_payload(model, random_delta(model, 2))
            return
        h.clients["b"].send(ROUND, sent["old"])  # type: ignore[arg-type]
        h.clients["a"].send(
            ROUND + 1, update_payload(model, random_delta(model, 3), round_=ROUND + 1)
        )

    h.on_round(answer)
    _, first, _ = h.run_round()

    # Execute
    result = h.coordinator.run_round(ROUND + 1)

    # Assert: the round went on with the small model; the old update was refused as late
    assert first.parameters == result.parameters < MLP_PARAMS
    assert result.reported == 1 and result.stale == 0
    assert result.rejected == {"round": 1}
