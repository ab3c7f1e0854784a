"""TF-MOT pruning of the global model, one schedule step per round (coordinator/pruning.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import tf_keras

from fedprune.coordinator import models
from fedprune.coordinator.config import ScheduleConfig, ScheduleKind
from fedprune.coordinator.pruning import Pruner, pruner_for
from fedprune.protocol.errors import ConfigError

TARGET = 0.8
# An odd ramp: with TF-MOT's own step counting (frequency > 1) the final update could be skipped.
BEGIN, END = 3, 10
ROUNDS = range(16)
JUNK = 10.0  # larger than any initial weight: a mask ranked on raw weights would keep it


@dataclass(frozen=True)
class Trace:
    """Masks (boolean, one per masked tensor) and overall sparsity after each round's step."""

    masks: list[list[np.ndarray]]
    sparsity: list[float]


def _schedule(kind: ScheduleKind, begin: int = BEGIN, end: int = END) -> ScheduleConfig:
    return ScheduleConfig(kind=kind, target=TARGET, begin_round=begin, end_round=end)


def _masks(pruner: Pruner) -> list[np.ndarray]:
    return [m.astype(bool) for m in pruner.model().masks if m is not None]


def _kept(size: int, sparsity: float) -> int:
    """Entries TF-MOT keeps at ``sparsity``: round(size * (1 - sparsity)), at least one."""
    return max(round(size * (1 - sparsity)), 1)


@pytest.fixture(scope="module")
def cnn() -> tf_keras.Model:
    return models.build("cnn", seed=0)


@pytest.fixture(scope="module")
def traces(cnn: tf_keras.Model) -> dict[ScheduleKind, Trace]:
    """Every schedule kind stepped through rounds 0..15 on the same initial weights."""
    out = {}
    for kind in ScheduleKind:
        pruner = Pruner(cnn, _schedule(kind))
        masks, sparsity = [], []
        for round_ in ROUNDS:
            pruner.step(round_)
            masks.append(_masks(pruner))
            sparsity.append(pruner.sparsity())
        out[kind] = Trace(masks=masks, sparsity=sparsity)
    return out


def test_cnn_has_three_masked_kernels_and_no_masked_bias(cnn: tf_keras.Model) -> None:
    pruner = Pruner(cnn, _schedule(ScheduleKind.POLYNOMIAL))

    model = pruner.model()

    shapes = [w.shape for w, m in zip(model.weights, model.masks, strict=True) if m is not None]
    assert shapes == [(3, 3, 1, 16), (1024, 128), (128, 10)]
    assert all(m is None for w, m in zip(model.weights, model.masks, strict=True) if w.ndim == 1)


def test_polynomial_is_dense_up_to_begin_round(traces: dict[ScheduleKind, Trace]) -> None:
    trace = traces[ScheduleKind.POLYNOMIAL]

    for round_ in range(BEGIN + 1):  # PolynomialDecay starts at initial_sparsity=0 on begin_round
        assert trace.sparsity[round_] == 0.0
        assert all(m.all() for m in trace.masks[round_])


def test_polynomial_sparsity_rises_strictly_during_the_ramp(
    traces: dict[ScheduleKind, Trace],
) -> None:
    sparsity = traces[ScheduleKind.POLYNOMIAL].sparsity

    ramp = sparsity[BEGIN : END + 1]

    assert all(later > earlier for earlier, later in zip(ramp, ramp[1:], strict=False))
    assert 0.0 < sparsity[BEGIN + 1] < sparsity[END - 1] < TARGET


def test_polynomial_keeps_tf_mot_rounded_count_from_end_round_on(
    traces: dict[ScheduleKind, Trace],
) -> None:
    trace = traces[ScheduleKind.POLYNOMIAL]

    for round_ in range(END, len(ROUNDS)):
        for mask in trace.masks[round_]:
            assert np.count_nonzero(mask) == _kept(mask.size, TARGET)
            assert abs((1 - mask.mean()) - TARGET) <= 1 / mask.size
        for mask, final in zip(trace.masks[round_], trace.masks[END], strict=True):
            np.testing.assert_array_equal(mask, final)
    sizes = [m.size for m in trace.masks[END]]
    assert abs(trace.sparsity[END] - TARGET) <= len(sizes) / sum(sizes)


@pytest.mark.parametrize(("begin", "end"), [(3, 10), (0, 5), (2, 9), (1, 2)])
def test_target_is_reached_exactly_when_ramp_length_is_odd_or_one(
    cnn: tf_keras.Model, begin: int, end: int
) -> None:
    pruner = Pruner(cnn, _schedule(ScheduleKind.POLYNOMIAL, begin, end))

    for round_ in range(end + 1):
        pruner.step(round_)

    for mask in _masks(pruner):
        assert np.count_nonzero(mask) == _kept(mask.size, TARGET)


def test_constant_jumps_to_target_at_begin_round(traces: dict[ScheduleKind, Trace]) -> None:
    trace = traces[ScheduleKind.CONSTANT]

    for round_ in ROUNDS:
        for mask in trace.masks[round_]:
            expected = mask.size if round_ < BEGIN else _kept(mask.size, TARGET)
            assert np.count_nonzero(mask) == expected


@pytest.mark.parametrize("kind", list(ScheduleKind))
def test_masks_never_regrow_across_rounds(
    traces: dict[ScheduleKind, Trace], kind: ScheduleKind
) -> None:
    masks = traces[kind].masks

    for earlier, later in zip(masks, masks[1:], strict=False):
        for old, new in zip(earlier, later, strict=True):
            assert not np.any(new & ~old)


@pytest.mark.parametrize("kind", list(ScheduleKind))
@pytest.mark.parametrize("pruned_at", [5, 12], ids=["in-ramp", "after-end"])
def test_weights_written_at_pruned_positions_are_zeroed_and_stay_pruned(
    cnn: tf_keras.Model,
    traces: dict[ScheduleKind, Trace],
    kind: ScheduleKind,
    pruned_at: int,
) -> None:
    pruner = Pruner(cnn, _schedule(kind))
    for round_ in range(pruned_at + 1):
        pruner.step(round_)
    model = pruner.model()
    weights = [w.copy() for w in model.weights]
    for weight, mask in zip(weights, model.masks, strict=True):
        if mask is not None:
            weight[mask == 0] = JUNK
    pruner.set_weights(weights)

    pruner.step(pruned_at + 1)

    after = pruner.model()
    for old, new, weight in zip(model.masks, after.masks, after.weights, strict=True):
        if old is None:
            continue
        assert not np.any((new == 1) & (old == 0))
        assert not np.any(weight[new == 0])
    # The junk changed nothing: the masks are those of a run that never saw it.
    for mask, clean in zip(_masks(pruner), traces[kind].masks[pruned_at + 1], strict=True):
        np.testing.assert_array_equal(mask, clean)


def test_all_zero_weights_do_not_reopen_a_mask(
    cnn: tf_keras.Model, traces: dict[ScheduleKind, Trace]
) -> None:
    # All magnitudes tie at 0, so TF-MOT's threshold is 0 and its new mask keeps everything.
    pruner = Pruner(cnn, _schedule(ScheduleKind.POLYNOMIAL))
    for round_ in range(6):
        pruner.step(round_)
    pruner.set_weights([np.zeros_like(w) for w in pruner.model().weights])

    pruner.step(6)

    for mask, before in zip(_masks(pruner), traces[ScheduleKind.POLYNOMIAL].masks[5], strict=True):
        np.testing.assert_array_equal(mask, before)


def test_model_masks_are_the_tf_mot_wrappers_mask_variables(cnn: tf_keras.Model) -> None:
    pruner = Pruner(cnn, _schedule(ScheduleKind.POLYNOMIAL))
    for round_ in range(7):
        pruner.step(round_)

    model = pruner.model()

    masked = [i for i, m in enumerate(model.masks) if m is not None]
    pruning_vars = [(w, m) for wrapper in pruner.wrappers for w, m, _ in wrapper.pruning_vars]
    assert len(masked) == len(pruning_vars) == 3
    for i, (weight, mask) in zip(masked, pruning_vars, strict=True):
        np.testing.assert_array_equal(model.masks[i], mask.numpy())
        np.testing.assert_array_equal(model.weights[i], weight.numpy())
        assert 0 < np.count_nonzero(model.masks[i]) < model.masks[i].size
    for weight, stripped in zip(model.weights, pruner.stripped.get_weights(), strict=True):
        np.testing.assert_array_equal(weight, stripped)


def test_mean_schedule_prunes_the_share_below_each_layers_mean_magnitude(
    cnn: tf_keras.Model,
) -> None:
    pruner = Pruner(cnn, _schedule(ScheduleKind.MEAN))
    for round_ in range(BEGIN):
        pruner.step(round_)
    # Heavy-tailed magnitudes: the share below the mean is far from one half (about 0.69).
    rng = np.random.default_rng(1)
    weights = [
        (rng.lognormal(sigma=1.0, size=w.shape) * rng.choice([-1, 1], size=w.shape)).astype(
            np.float32
        )
        for w in pruner.model().weights
    ]
    pruner.set_weights(weights)
    expected = []
    for wrapper in pruner.wrappers:
        for weight, _, _ in wrapper.pruning_vars:
            magnitude = np.abs(weight.numpy())
            expected.append(float(np.mean(magnitude < magnitude.mean())))

    pruner.step(BEGIN)

    masks = _masks(pruner)
    assert len(masks) == len(expected) == 3
    for mask, share in zip(masks, expected, strict=True):
        assert 0.6 < share < 0.8
        assert abs((1 - mask.mean()) - share) <= 1 / mask.size


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"begin_round": 5, "end_round": 5}, "end_round (5)"),
        ({"begin_round": 5, "end_round": 4}, "end_round (4)"),
        ({"kind": ScheduleKind.MEAN, "begin_round": 3, "end_round": 3}, "end_round (3)"),
        ({"target": 1.0}, "1.0"),
        ({"target": -0.1}, "-0.1"),
        ({"begin_round": -1}, "-1"),
    ],
)
def test_schedule_config_rejects_bad_values_naming_them(
    kwargs: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        ScheduleConfig(**kwargs)  # type: ignore[arg-type]

    assert named in str(caught.value)


def test_constant_schedule_ignores_end_round() -> None:
    config = ScheduleConfig(kind=ScheduleKind.CONSTANT, begin_round=4, end_round=0)

    assert config.begin_round == 4


def test_structured_two_by_four_is_applied_at_begin_round_and_kept() -> None:
    # Prepare
    schedule = ScheduleConfig(structure="2:4", begin_round=3)
    pruner = pruner_for(models.mlp(), schedule)

    # Execute
    sparsities = []
    for round_ in range(1, 7):
        pruner.step(round_)
        sparsities.append(pruner.sparsity())

    # Assert: dense before round 3, then exactly 2 of every 4 consecutive input weights kept
    assert sparsities[:2] == [0.0, 0.0]
    assert sparsities[2:] == [0.5] * 4
    for mask in (m for m in pruner.model().masks if m is not None):
        groups = mask.T.reshape(mask.shape[1], -1, 4)
        assert np.all(groups.sum(axis=-1) == 2)


def test_a_negative_moving_variance_from_aggregation_is_set_to_zero_not_turned_into_nan() -> None:
    # Prepare: updates that sum to a moving variance below zero (a lossy codec's rounding, or a
    # hostile device), in the autoencoder preset's BatchNormalization layers
    pruner = pruner_for(models.build("autoencoder", seed=0), _schedule(ScheduleKind.POLYNOMIAL))
    weights = pruner.model().weights
    variances = [i for i, v in enumerate(pruner.stripped.weights) if "moving_variance" in v.name]
    for i in variances:
        weights[i] = np.full_like(weights[i], -0.25)
    x = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)

    # Execute
    pruner.set_weights(weights)

    # Assert: those variances are 0, everything else as given, and the model's outputs finite
    after = pruner.model().weights
    assert len(variances) == 9
    assert all(np.array_equal(after[i], np.zeros_like(after[i])) for i in variances)
    others = [i for i in range(len(weights)) if i not in variances]
    assert all(np.array_equal(after[i], weights[i]) for i in others)
    assert np.isfinite(pruner.stripped(x, training=False).numpy()).all()
