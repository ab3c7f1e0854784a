"""The local training rules of protocol 1.13 on a device: a round's learning rate
(``Round.learning_rate``) reaches the trainer without rebuilding it, and the litert trainer sets it
in its artifact (``set_lr``) or refuses, in one line, a rate an artifact without ``set_lr`` cannot
train at; a Spec's ``prox_mu`` out of range is refused.

The tests with a real artifact build it with TensorFlow, and are skipped where it is missing; the
keras trainer's rules are in test_keras_trainer_rules.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from artifact_signatures import without
from client_harness import SPEC, AddOneTrainer

from fedprune.edge_client.data import LocalData
from fedprune.edge_client.litert_trainer import SET_LR, LiteRTTrainer
from fedprune.edge_client.local_training import LocalTraining
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ModelError, WireError
from fedprune.protocol.messages import Manifest, Round, Spec

LR, OTHER_LR, BATCH = 0.05, 0.2, 8


def _round(number: int, learning_rate: float) -> Round:
    return Round(
        round=number,
        model_version=number,
        deadline=0.0,
        model=Manifest(topic="m", size=0, chunks=1, sha256=""),
        local_epochs=2,
        learning_rate=learning_rate,
    )


def test_each_round_trains_at_its_learning_rate_with_one_trainer(
    model: Model, data: LocalData
) -> None:
    # Prepare: the fake backend (conftest) and rounds at a rate, at none (0), at another
    local = LocalTraining("fake", data)

    # Execute
    trainers = []
    for number, rate in ((1, 0.3), (2, 0.0), (3, 0.01)):
        local.train(_round(number, rate), SPEC, model, None, "session")
        trainers.append(local._trainer)

    # Assert: the Spec's rate where the round has none; the trainer made once
    trainer = trainers[0]
    assert isinstance(trainer, AddOneTrainer)
    assert trainer.rates == [0.3, SPEC.learning_rate, 0.01]
    assert trainers == [trainer] * 3


@pytest.mark.parametrize("mu", [-0.5, float("nan"), float("inf")])
def test_a_spec_whose_prox_mu_is_out_of_range_is_refused(mu: float) -> None:
    with pytest.raises(WireError, match=f"the run's prox_mu must be finite and >= 0, got {mu}"):
        AddOneTrainer(dataclasses.replace(SPEC, prox_mu=mu))


@pytest.fixture(scope="module")
def mlp() -> tuple[Spec, Model, bytes]:
    """A small classifier of the conftest's data (4 features, 3 classes), its Spec at LR with
    SGD and momentum, and its training artifact."""
    tf_keras = pytest.importorskip("tf_keras")
    from fedprune.converters.trainable import build_trainable

    tf_keras.utils.set_random_seed(0)
    keras_model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((4,)),
            tf_keras.layers.Dense(8, activation="tanh"),
            tf_keras.layers.Dense(3, activation="softmax"),
        ]
    )
    spec = Spec(
        model_json=keras_model.to_json(),
        input_shape=[4],
        optimizer="sgd",
        learning_rate=LR,
        momentum=0.9,
        local_epochs=2,
        batch_size=BATCH,
    )
    artifact = build_trainable(
        keras_model, batch_size=BATCH, optimizer="sgd", learning_rate=LR, momentum=0.9
    )
    weights = keras_model.get_weights()
    return spec, Model(weights=weights, masks=[None] * len(weights)), artifact


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_a_litert_round_trains_as_a_keras_trainer_built_at_the_rounds_rate(
    mlp: tuple[Spec, Model, bytes], data: LocalData
) -> None:
    # Prepare: what the keras trainer makes at the round's rate, and at the Spec's
    from fedprune.edge_client.keras_trainer import KerasTrainer

    spec, model, artifact = mlp
    seed = 2  # LocalTraining's for round 2 of a device of seed 0
    at_round = KerasTrainer(dataclasses.replace(spec, learning_rate=OTHER_LR))
    want = at_round.fit(model, data.x, data.y, epochs=2, seed=seed)
    at_spec = KerasTrainer(spec).fit(model, data.x, data.y, epochs=2, seed=seed)
    local = LocalTraining("litert", data)

    # Execute
    trained = local.train(_round(2, OTHER_LR), spec, model, artifact, "session")

    # Assert
    got = [w + d for w, d in zip(model.weights, trained.update.deltas, strict=True)]
    assert _max_diff(got, want) < 1e-5
    assert _max_diff(got, at_spec) > 1e-2


def test_the_litert_trainer_goes_back_to_the_specs_rate(
    mlp: tuple[Spec, Model, bytes], data: LocalData
) -> None:
    # Prepare: a trainer that trained a round at another rate, and a fresh one
    spec, model, artifact = mlp
    used, fresh = LiteRTTrainer(spec, artifact=artifact), LiteRTTrainer(spec, artifact=artifact)
    other = used.fit(model, data.x, data.y, epochs=2, seed=3, learning_rate=OTHER_LR)

    # Execute: a round without a rate of its own
    got = used.fit(model, data.x, data.y, epochs=2, seed=3)

    # Assert
    want = fresh.fit(model, data.x, data.y, epochs=2, seed=3)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _max_diff(got, other) > 1e-2


def test_an_artifact_without_set_lr_trains_at_the_specs_rate_only(
    mlp: tuple[Spec, Model, bytes], data: LocalData
) -> None:
    # Prepare
    spec, model, artifact = mlp
    old = without(artifact, SET_LR)
    trainer = LiteRTTrainer(spec, artifact=old)
    want = LiteRTTrainer(spec, artifact=artifact).fit(model, data.x, data.y, epochs=1, seed=4)

    # Execute
    got = trainer.fit(model, data.x, data.y, epochs=1, seed=4, learning_rate=LR)
    with pytest.raises(ModelError) as refused:
        trainer.fit(model, data.x, data.y, epochs=1, seed=4, learning_rate=OTHER_LR)

    # Assert
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert str(refused.value) == (
        "the training artifact has no set_lr signature (built by a coordinator older than"
        " protocol 1.13): it cannot train at this round's learning rate 0.2"
    )
