"""The server optimizers' arithmetic against hand-computed steps (Reddi et al. 2021, Alg. 2)."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.fedavg import FedAvg
from fedprune.coordinator.server_optimizer import ServerOptimizer
from fedprune.protocol.codec import Model, Update
from fedprune.protocol.errors import ConfigError

DELTA = [np.array([0.1, -0.2])]


def model(*weights: list[float], masks: list[np.ndarray | None] | None = None) -> Model:
    arrays = [np.array(w, np.float32) for w in weights]
    return Model(weights=arrays, masks=masks or [None] * len(arrays))


def test_sgd_at_lr_1_is_fedavg_to_the_bit() -> None:
    fedavg = FedAvg([(3,)])
    rng = np.random.default_rng(0)
    for samples in (10, 30):
        deltas = [rng.normal(size=3).astype(np.float32)]
        fedavg.add(Update(round=1, num_samples=samples, deltas=deltas, metrics={}))
    old = model([0.3, -1.7, 2.2])
    (expected,) = fedavg.apply(old.weights)
    (got,) = ServerOptimizer("sgd").step(old, fedavg.delta(old.weights) or [])
    assert got.tobytes() == expected.tobytes()


def test_sgd_scales_the_aggregate_by_its_lr() -> None:
    (got,) = ServerOptimizer("sgd", lr=0.5).step(model([1.0, 1.0]), DELTA)
    np.testing.assert_allclose(got, [1.05, 0.9], rtol=1e-6)


def test_momentum_accumulates_the_aggregates() -> None:
    server = ServerOptimizer("momentum", lr=0.5, momentum=0.9)
    first = server.step(model([0.0, 0.0]), DELTA)
    np.testing.assert_allclose(first[0], [0.05, -0.1], rtol=1e-6)  # m = delta
    (second,) = server.step(model(list(first[0])), DELTA)
    # m = 0.9 * [0.1, -0.2] + [0.1, -0.2] = [0.19, -0.38]; x += 0.5 * m
    np.testing.assert_allclose(second, [0.05 + 0.095, -0.1 - 0.19], rtol=1e-6)


def test_each_rule_has_its_default_lr() -> None:
    assert ServerOptimizer("momentum", momentum=0.8).lr == 1.0
    assert ServerOptimizer("adam").lr == ServerOptimizer("yogi").lr == 0.01
    assert ServerOptimizer("adagrad").lr == 0.03
    assert ServerOptimizer("sgd").lr == 1.0


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # m = 0.1 * delta = [0.01, -0.02]; v starts at tau^2 = 0.01
        # adam: v = 0.99 * 0.01 + 0.01 * delta^2 = [0.01, 0.0103]
        ("adam", [0.5 * 0.01 / (0.1 + 0.1), 0.5 * -0.02 / (0.0103**0.5 + 0.1)]),
        # yogi: v = 0.01 - 0.01 * delta^2 * sign(0.01 - delta^2) = [0.01 (sign 0), 0.0104]
        ("yogi", [0.5 * 0.01 / (0.1 + 0.1), 0.5 * -0.02 / (0.0104**0.5 + 0.1)]),
        # adagrad: v = 0.01 + delta^2 = [0.02, 0.05]
        ("adagrad", [0.5 * 0.01 / (0.02**0.5 + 0.1), 0.5 * -0.02 / (0.05**0.5 + 0.1)]),
    ],
)
def test_adaptive_rules_take_the_papers_first_step(rule: str, expected: list[float]) -> None:
    server = ServerOptimizer(rule, lr=0.5, beta1=0.9, beta2=0.99, tau=0.1)
    (got,) = server.step(model([0.0, 0.0]), DELTA)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_adam_second_step_uses_its_averages() -> None:
    server = ServerOptimizer("adam", lr=0.5, beta1=0.9, beta2=0.99, tau=0.1)
    server.step(model([0.0]), [np.array([0.1])])
    (got,) = server.step(model([0.0]), [np.array([-0.3])])
    m = 0.9 * 0.01 + 0.1 * -0.3  # -0.021
    v = 0.99 * (0.99 * 0.01 + 0.01 * 0.01) + 0.01 * 0.09  # 0.0108
    np.testing.assert_allclose(got, [0.5 * m / (v**0.5 + 0.1)], rtol=1e-6)


def test_a_pruned_weight_stays_zero_with_the_momentum_it_had() -> None:
    server = ServerOptimizer("momentum", lr=1.0, momentum=0.9)
    server.step(model([1.0, 1.0]), [np.array([0.5, 0.5])])  # both move: momentum 0.5 each
    pruned = model([1.5, 0.0], masks=[np.array([1.0, 0.0], np.float32)])
    (got,) = server.step(pruned, [np.array([0.0, 0.0])])  # pruned weights get no delta
    assert got[1] == 0.0
    assert got[0] == pytest.approx(1.5 + 0.45)
    (again,) = server.step(model([1.0, 0.0]), [np.array([0.0, 0.0])])
    assert again[1] == 0.0  # its momentum went with the mask


def test_batch_norm_statistics_take_the_aggregate_as_it_is() -> None:
    bn = Model(
        weights=[np.zeros(2, np.float32), np.ones(2, np.float32)],
        masks=[None, None],
        exact=frozenset({1}),  # a moving variance
    )
    kernel, variance = ServerOptimizer("adam", lr=0.5).step(bn, [DELTA[0], DELTA[0]])
    np.testing.assert_allclose(variance, [1.1, 0.8], rtol=1e-6)
    assert not np.allclose(kernel, DELTA[0])


def test_its_state_goes_and_comes_back_and_must_fit_the_model() -> None:
    server = ServerOptimizer("yogi", lr=0.5)
    server.step(model([0.0, 0.0]), DELTA)
    again = ServerOptimizer("yogi", lr=0.5)
    again.load(server.state(), [(2,)])
    a = server.step(model([0.1, 0.1]), DELTA)
    b = again.step(model([0.1, 0.1]), DELTA)
    assert a[0].tobytes() == b[0].tobytes()
    with pytest.raises(ConfigError, match="does not fit"):
        ServerOptimizer("yogi").load(server.state(), [(3,)])


def test_a_rebuild_cuts_the_state_as_the_weights_or_starts_it_again() -> None:
    server = ServerOptimizer("adam")
    server.step(model([0.0, 0.0]), DELTA)
    server.cut(lambda arrays: [a[1:] for a in arrays])  # the rebuild removed the first weight
    np.testing.assert_allclose(server.m[0], [0.1 * -0.2])  # m of the second weight only
    server.cut(None)
    assert server.state() == {}
    (got,) = server.step(model([0.0, 0.0, 0.0]), [np.array([0.1, 0.1, 0.1])])  # a new shape
    assert got.shape == (3,)


def test_run_options_check_the_server_optimizer() -> None:
    assert RunConfig(server_optimizer="yogi", server_lr=0.1).server().lr == 0.1
    for bad in (
        {"server_optimizer": "nesterov"},
        {"server_lr": -1.0},
        {"server_momentum": 1.0},
        {"server_tau": 0.0},
        {"prox_mu": -0.1},
        {"lr_decay": 0.0},
        {"lr_schedule": "step"},
    ):
        with pytest.raises(ConfigError):
            RunConfig(**bad)  # type: ignore[arg-type]


def test_the_learning_rate_schedules_over_rounds() -> None:
    constant = RunConfig(rounds=12, learning_rate=0.1)
    assert [constant.learning_rate_of(r) for r in (1, 12)] == [0.1, 0.1]
    decay = RunConfig(rounds=12, learning_rate=0.1, lr_schedule="exponential", lr_decay=0.5)
    assert decay.learning_rate_of(3) == pytest.approx(0.025)
    cosine = RunConfig(rounds=12, learning_rate=0.12, lr_schedule="cosine")
    assert cosine.learning_rate_of(1) == pytest.approx(0.12)
    assert cosine.learning_rate_of(12) == pytest.approx(0.01)  # lr / rounds
    middle = 0.01 + 0.11 * 0.5 * (1 + np.cos(np.pi * 6 / 11))
    assert cosine.learning_rate_of(7) == pytest.approx(middle)
    assert decay.training_rules == {"schedule"}
    assert RunConfig(prox_mu=0.01).training_rules == {"prox"}
    assert constant.training_rules == set()
