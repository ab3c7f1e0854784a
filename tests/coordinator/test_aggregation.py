"""The aggregation rules: FedAvg as a streaming sum, the robust rules, norm clipping."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedprune.coordinator.aggregation import NormBound, make_aggregator, median_norm, tolerated
from fedprune.coordinator.fedavg import FedAvg
from fedprune.coordinator.trimmed_mean import trimmed
from fedprune.protocol.codec import Update
from fedprune.protocol.errors import ConfigError


def _shapes(rng: np.random.Generator) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in rng.integers(1, 6, size=rng.integers(1, 4))) for _ in range(4)]


def _masks(rng: np.random.Generator, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    return [(rng.random(shape) < 0.6).astype(np.float32) for shape in shapes]


def _reference(
    old: list[np.ndarray], deltas: list[list[np.ndarray]], samples: list[int]
) -> list[np.ndarray]:
    total = sum(samples)
    return [
        (
            w.astype(np.float64)
            + sum(n * d[i].astype(np.float64) for n, d in zip(samples, deltas, strict=True)) / total
        ).astype(np.float32)
        for i, w in enumerate(old)
    ]


@pytest.mark.parametrize("clients", range(1, 7))
def test_apply_is_old_plus_sample_weighted_mean_of_deltas(clients: int) -> None:
    rng = np.random.default_rng(clients)
    shapes = _shapes(rng)
    masks = _masks(rng, shapes)
    old = [
        (rng.standard_normal(s) * m).astype(np.float32) for s, m in zip(shapes, masks, strict=True)
    ]
    deltas = [
        [
            (rng.standard_normal(s) * m).astype(np.float32)
            for s, m in zip(shapes, masks, strict=True)
        ]
        for _ in range(clients)
    ]
    samples = [int(n) for n in rng.integers(1, 500, size=clients)]
    fedavg = FedAvg(shapes)

    for d, n in zip(deltas, samples, strict=True):
        fedavg.add(Update(round=1, num_samples=n, deltas=d))
    new = fedavg.apply(old)

    assert fedavg.count == clients
    assert fedavg.total_samples == sum(samples)
    for got, want, mask, before in zip(
        new, _reference(old, deltas, samples), masks, old, strict=True
    ):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got[mask == 0], before[mask == 0])
        assert not np.any(got[mask == 0])


def test_masked_positions_keep_old_value_exactly_even_when_not_zero() -> None:
    old = [np.array([[1.5, -2.25], [3.0, 0.0]], np.float32)]
    mask = np.array([[1, 0], [0, 1]], np.float32)
    fedavg = FedAvg([(2, 2)])

    fedavg.add(
        Update(round=1, num_samples=3, deltas=[np.array([[1, 0], [0, 2]], np.float32) * mask])
    )
    fedavg.add(Update(round=1, num_samples=1, deltas=[np.array([[5, 0], [0, -2]], np.float32)]))
    new = fedavg.apply(old)

    np.testing.assert_array_equal(new[0], np.array([[1.5 + 2.0, -2.25], [3.0, 1.0]], np.float32))


def test_apply_without_updates_returns_the_weights_unchanged() -> None:
    old = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
    fedavg = FedAvg([(2, 3), (3,)])

    new = fedavg.apply(old)

    assert fedavg.count == 0
    for got, want in zip(new, old, strict=True):
        np.testing.assert_array_equal(got, want)
    assert fedavg.client_metrics() == {}


def test_client_metrics_are_weighted_by_held_out_size() -> None:
    fedavg = FedAvg([(1,)])
    delta = [np.zeros(1, np.float32)]

    fedavg.add(
        Update(
            round=1,
            num_samples=100,
            deltas=delta,
            metrics={"n_eval": 10.0, "loss": 1.0, "accuracy": 0.5},
        )
    )
    fedavg.add(
        Update(
            round=1,
            num_samples=1,
            deltas=delta,
            metrics={"n_eval": 30.0, "loss": 0.2, "accuracy": 0.9},
        )
    )
    fedavg.add(
        Update(
            round=1,
            num_samples=50,
            deltas=delta,
            metrics={"n_eval": 0.0, "loss": 9.0, "accuracy": 0.0},
        )
    )
    fedavg.add(Update(round=1, num_samples=50, deltas=delta, metrics={"loss": 9.0}))

    metrics = fedavg.client_metrics()

    assert metrics.keys() == {"loss", "accuracy"}
    assert metrics["loss"] == pytest.approx((10 * 1.0 + 30 * 0.2) / 40)
    assert metrics["accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)


def _update(values: list[float], num_samples: int = 10) -> Update:
    return Update(round=1, num_samples=num_samples, deltas=[np.array(values, np.float32)])


@pytest.mark.parametrize(
    ("rule", "want"),
    [
        ("fedavg", [10_000 * 1000 / 1030 + 3 / 1030 * 10, 0.0]),
        ("median", [1.0, 0.0]),
        ("trimmed-mean", [1.0, 0.0]),
    ],
)
def test_robust_rules_ignore_an_outlier_and_its_claimed_samples(
    rule: str, want: list[float]
) -> None:
    # Prepare: three honest devices move weight 0 by 1.0; one claims 1,000 samples and 10,000
    aggregator = make_aggregator(rule, [(2,)], trim=0.25)
    for _ in range(3):
        aggregator.add(_update([1.0, 0.0]))
    aggregator.add(_update([10_000.0, 0.0], num_samples=1000))

    # Execute
    (new,) = aggregator.apply([np.zeros(2, np.float32)])

    # Assert: FedAvg follows the liar; the robust rules do not (pruned weight 1 stays put)
    np.testing.assert_allclose(new, np.float32(want), rtol=1e-5)


def test_trimmed_mean_drops_the_given_share_at_each_end() -> None:
    # Prepare: ten devices, values 0..9 for one weight; trim 0.2 drops two at each end
    aggregator = make_aggregator("trimmed-mean", [(1,)], trim=0.2)
    for value in range(10):
        aggregator.add(_update([float(value)]))

    # Execute / Assert: mean of 2..7
    np.testing.assert_allclose(aggregator.apply([np.zeros(1, np.float32)])[0], [4.5])


def test_norm_clipping_scales_large_updates_down_to_the_limit() -> None:
    # Prepare: one update of norm 5 (3, 4) and one of norm 0.5, clipped at 1
    aggregator = make_aggregator("fedavg", [(2,)], clip_norm=1.0)
    aggregator.add(_update([3.0, 4.0]))
    aggregator.add(_update([0.3, 0.4]))

    # Execute
    (new,) = aggregator.apply([np.zeros(2, np.float32)])

    # Assert: (0.6, 0.8) and (0.3, 0.4) averaged; one update was clipped; the norms as they came
    np.testing.assert_allclose(new, [0.45, 0.6], rtol=1e-6)
    assert aggregator.clipped() == 1
    np.testing.assert_allclose(aggregator.norms, [5.0, 0.5])


def test_the_adaptive_bound_follows_the_previous_rounds_median_norm() -> None:
    # Prepare: 3x the median; a model of norm 13 (5, 12)
    bound = NormBound(multiple=3.0)
    weights = [np.array([5.0, 12.0], np.float32)]

    # Execute / Assert: before any round took updates, the model's own norm
    assert bound.of(weights) == pytest.approx(13.0)
    # a round of norms 1, 2 and 1000 (one liar): 3 x the median 2
    bound.observe(median_norm([1.0, 1000.0, 2.0]))
    assert bound.of(weights) == pytest.approx(6.0)
    # a round without updates (or only zero ones) keeps the bound
    bound.observe(median_norm([]))
    bound.observe(median_norm([0.0, 0.0]))
    assert bound.of(weights) == pytest.approx(6.0)


def test_a_fixed_clip_norm_wins_and_zero_means_no_bound() -> None:
    weights = [np.ones(4, np.float32)]
    assert NormBound(fixed=5.0, multiple=3.0).of(weights) == 5.0
    assert NormBound().of(weights) == 0.0


def test_the_liar_of_three_moves_the_next_bound_no_further_than_an_honest_device() -> None:
    # Prepare: two honest updates of norm about 1, one of norm 1e4 (near the old fixed limit)
    bound = NormBound(multiple=3.0)
    bound.observe(1.0)
    aggregator = make_aggregator("fedavg", [(2,)], clip_norm=bound.of([np.zeros(2)]))
    for values in ([0.6, 0.8], [0.8, 0.6], [6000.0, 8000.0]):
        aggregator.add(_update(values))

    # Execute
    (new,) = aggregator.apply([np.zeros(2, np.float32)])
    bound.observe(median_norm(aggregator.norms))

    # Assert: the liar's update counts with norm 3 at most, and the next bound is still 3
    assert aggregator.clipped() == 1
    assert float(np.linalg.norm(new)) <= (1 + 1 + 3) / 3 + 1e-6
    assert bound.of([np.zeros(2)]) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"rule": "krum"},
            "unknown aggregation 'krum' (one of fedavg, median, trimmed-mean, screened)",
        ),
        ({"rule": "trimmed-mean", "trim": 0.5}, "trim must be in [0, 0.5), got 0.5"),
        ({"rule": "median", "clip_norm": -1.0}, "clip_norm must be >= 0 (0 = off), got -1.0"),
    ],
)
def test_bad_aggregation_settings_are_one_line(kwargs: dict[str, object], message: str) -> None:
    rule = str(kwargs.pop("rule"))
    with pytest.raises(ConfigError) as caught:
        make_aggregator(rule, [(1,)], **kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message


@pytest.mark.parametrize(("devices", "dropped"), [(2, 0), (3, 1), (5, 1), (10, 1), (20, 2)])
def test_trimmed_mean_drops_at_least_one_at_each_end_from_three_devices(
    devices: int, dropped: int
) -> None:
    # Prepare: one weight; one device sends 1,000, the others 0..devices-2
    aggregator = make_aggregator("trimmed-mean", [(1,)], trim=0.1)
    values = [*range(devices - 1), 1000]
    for value in values:
        aggregator.add(Update(round=1, num_samples=1, deltas=[np.array([float(value)])]))

    # Execute
    (delta,) = aggregator.apply([np.zeros(1, np.float32)])

    # Assert: the outlier is dropped whenever there are three or more
    kept = sorted(values)[dropped : devices - dropped]
    assert trimmed(0.1, devices) == dropped
    np.testing.assert_allclose(delta, [np.mean(kept)], rtol=1e-6)
    assert (delta[0] < 1000 / devices) == (devices >= 3)


@pytest.mark.parametrize(
    ("rule", "devices", "trim", "expected"),
    [
        ("median", 3, 0.1, 1),
        ("median", 10, 0.1, 4),
        ("trimmed-mean", 10, 0.1, 1),
        ("trimmed-mean", 10, 0.2, 2),
        ("trimmed-mean", 2, 0.1, 0),
        ("fedavg", 10, 0.1, 0),
    ],
)
def test_each_rule_says_how_many_byzantine_devices_it_tolerates(
    rule: str, devices: int, trim: float, expected: int
) -> None:
    assert tolerated(rule, devices, trim) == expected


def _distance_to(target: list[float]) -> Callable[[list[np.ndarray]], float]:
    """A held-out loss whose best model is ``target``."""
    return lambda weights: float(np.sum((weights[0] - np.array(target)) ** 2))


def test_screened_leaves_out_the_update_that_makes_the_held_out_loss_worse() -> None:
    # Prepare: two honest devices step towards (1, 1); a liar claims 100x the samples and pulls
    # the other way (its claim already capped to 3x by the intake)
    aggregator = make_aggregator("screened", [(2,)], loss=_distance_to([1.0, 1.0]))
    aggregator.add(_update([0.5, 0.4]), source="a")
    aggregator.add(_update([0.4, 0.5]), source="b")
    aggregator.add(_update([-5.0, -5.0]), weight=3.0, source="liar")

    # Execute
    (new,) = aggregator.apply([np.zeros(2, np.float32)])

    # Assert: the honest devices' FedAvg, and who was left out
    np.testing.assert_allclose(new, [0.45, 0.45], rtol=1e-6)
    assert aggregator.left_out == ["liar"]


def test_screened_never_leaves_out_half_of_a_round_nor_one_whose_absence_does_not_help() -> None:
    # Prepare: four updates, three of them bad; and a round where no absence lowers the loss
    bad = make_aggregator("screened", [(1,)], loss=_distance_to([1.0]))
    for value, source in ((0.5, "a"), (-2.0, "b"), (-3.0, "c"), (-4.0, "d")):
        bad.add(_update([value]), source=source)
    good = make_aggregator("screened", [(1,)], loss=_distance_to([1.0]))
    for value in (0.3, 0.3, 0.3):
        good.add(_update([value]))

    # Execute
    bad.apply([np.zeros(1, np.float32)])
    (new,) = good.apply([np.zeros(1, np.float32)])

    # Assert: at most (4 - 1) // 2 = 1 left out (the worst); none of the equal ones
    assert bad.left_out == ["d"]
    assert good.left_out == []
    np.testing.assert_allclose(new, [0.3], rtol=1e-6)


def test_screened_does_not_judge_two_updates() -> None:
    aggregator = make_aggregator("screened", [(1,)], loss=_distance_to([1.0]))
    aggregator.add(_update([0.5]))
    aggregator.add(_update([-5.0]))
    (new,) = aggregator.apply([np.zeros(1, np.float32)])
    np.testing.assert_allclose(new, [-2.25], rtol=1e-6)  # which of two lies? no one can say
    assert aggregator.left_out == []


def test_screened_without_a_held_out_set_is_one_line() -> None:
    with pytest.raises(ConfigError, match="^the screened rule needs a held-out set"):
        make_aggregator("screened", [(1,)])


def test_screened_leaves_out_two_devices_that_send_the_same_lie() -> None:
    # Prepare: three honest devices, two colluders sending the same update
    aggregator = make_aggregator("screened", [(1,)], loss=_distance_to([1.0]))
    for value, source in ((0.5, "a"), (0.4, "b"), (0.6, "c"), (-3.0, "x"), (-3.0, "y")):
        aggregator.add(_update([value]), source=source)

    # Execute
    (new,) = aggregator.apply([np.zeros(1, np.float32)])

    # Assert
    assert sorted(aggregator.left_out) == ["x", "y"]
    np.testing.assert_allclose(new, [0.5], rtol=1e-6)
