"""Model presets and user model files (coordinator/models.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tf_keras

from fedprune.converters.task import task_of
from fedprune.coordinator import models
from fedprune.coordinator.config import ScheduleConfig
from fedprune.coordinator.pruning import Pruner
from fedprune.edge_client.task import Task
from fedprune.protocol.errors import ConfigError


def test_cnn_preset_has_132650_parameters() -> None:
    model = models.build("cnn")

    assert model.count_params() == 132_650
    assert model.input_shape == (None, 8, 8, 1)
    assert model.output_shape == (None, 10)


def test_mlp_preset_has_8970_parameters() -> None:
    model = models.build("mlp")

    assert model.count_params() == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10


def test_build_is_reproducible_for_a_seed() -> None:
    first = models.build("mlp", seed=7).get_weights()
    second = models.build("mlp", seed=7).get_weights()
    other = models.build("mlp", seed=8).get_weights()

    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("notes.txt", "not a model", "expected a .keras or .h5 file"),
        ("model.keras", "not a model either", "model.keras: not a Keras model file ("),
        ("model.h5", "plain text", "model.h5: not a Keras model file ("),
        ("missing.keras", None, "no such file"),
    ],
)
def test_unusable_file_is_one_line_config_error(
    tmp_path: Path, name: str, content: str | None, reason: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)

    with pytest.raises(ConfigError) as caught:
        models.build(str(path))

    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert reason in message


def test_user_keras_file_loads_and_wraps(tmp_path: Path) -> None:
    tf_keras.utils.set_random_seed(3)
    small = tf_keras.Sequential(
        [
            tf_keras.layers.Input((6,)),
            tf_keras.layers.Dense(5, activation="relu"),
            tf_keras.layers.Dense(2, activation="softmax"),
        ]
    )
    path = tmp_path / "small.keras"
    small.save(path)

    loaded = models.build(str(path))
    pruner = Pruner(loaded, ScheduleConfig(target=0.5, begin_round=0, end_round=1))
    pruner.step(0)
    pruner.step(1)

    for got, want in zip(loaded.get_weights(), small.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    model = pruner.model()
    assert [m.shape for m in model.masks if m is not None] == [(6, 5), (5, 2)]
    assert [int(np.count_nonzero(m)) for m in model.masks if m is not None] == [15, 5]
    assert pruner.sparsity() == pytest.approx(20 / 40)


def _functional(head: str) -> tf_keras.Model:
    """A user-style Functional classifier of 8x8 images whose output is made by ``head``."""
    inputs = tf_keras.Input((8, 8, 1))
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = tf_keras.layers.Flatten()(x)
    if head == "logits":
        x = tf_keras.layers.Dense(10, name="logits")(x)
    elif head == "softmax-layer":
        x = tf_keras.layers.Softmax()(tf_keras.layers.Dense(10)(x))
    elif head == "activation-layer":
        x = tf_keras.layers.Activation("softmax")(tf_keras.layers.Dense(10)(x))
    else:
        x = tf_keras.layers.Dense(10, activation="softmax")(x)
    return tf_keras.Model(inputs, x, name=f"user-{head}")


@pytest.mark.parametrize("head", ["dense-softmax", "softmax-layer", "activation-layer"])
def test_a_functional_classifier_ending_in_a_softmax_is_accepted(tmp_path: Path, head: str) -> None:
    # Prepare
    path = tmp_path / "user.keras"
    _functional(head).save(path)

    # Execute
    model = models.build(str(path))

    # Assert
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_model_without_a_softmax_output_is_refused_with_one_line(
    tmp_path: Path, suffix: str
) -> None:
    # Prepare: logits out, as many Keras examples end (then trained with from_logits=True)
    path = tmp_path / f"logits{suffix}"
    _functional("logits").save(path)

    # Execute
    with pytest.raises(ConfigError) as caught:
        models.build(str(path))

    # Assert
    assert str(caught.value) == (
        f"{path}: the output layer 'logits' ends in 'linear', not a softmax; fedprune trains"
        " classifiers that output probabilities (give it activation='softmax') and autoencoders"
        " whose output has the input's size"
    )


def test_a_model_with_a_lambda_layer_is_refused_at_start(tmp_path: Path) -> None:
    # Prepare: a Lambda carries Python code, which devices never build from the network
    inputs = tf_keras.Input((4,))
    x = tf_keras.layers.Lambda(lambda t: t * 2.0, name="double")(inputs)
    path = tmp_path / "lambda.h5"
    tf_keras.Model(inputs, tf_keras.layers.Dense(3, activation="softmax")(x)).save(path)

    # Execute
    with pytest.raises(ConfigError) as caught:
        models.build(str(path))

    # Assert
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "Lambda" in message and "\n" not in message


def test_the_autoencoder_preset_saved_as_a_users_file_loads_as_a_reconstruction(
    tmp_path: Path,
) -> None:
    # Prepare
    path = tmp_path / "autoencoder.keras"
    models.build("autoencoder", seed=3).save(path)

    # Execute
    loaded = models.build(str(path))

    # Assert: the same model, and what it learns read from its output
    assert task_of(loaded) is Task.RECONSTRUCT
    assert loaded.count_params() == 36_456
    for a, b in zip(
        loaded.get_weights(), models.build("autoencoder", seed=3).get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)
