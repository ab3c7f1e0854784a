"""Rebuilding a unit-pruned model smaller: the same outputs as the masked model it came from."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tf_keras

from fedprune.coordinator import models
from fedprune.coordinator.structure import check_chain, rebuild, unit_layers, unit_norms
from fedprune.protocol.errors import ConfigError

layers = tf_keras.layers


def conv_bn() -> tf_keras.Model:
    """Conv -> BN -> ReLU -> Conv (same padding) -> pool -> Flatten -> Dense (sigmoid) -> out."""
    tf_keras.utils.set_random_seed(0)
    return tf_keras.Sequential(
        [
            layers.Input((8, 8, 1)),
            layers.Conv2D(6, 3, padding="same"),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(12, activation="sigmoid"),
            layers.Dropout(0.2),
            layers.Dense(10, activation="softmax"),
        ]
    )


def conv_valid() -> tf_keras.Model:
    """A functional chain: Conv (tanh) -> Conv (valid) -> global pooling -> Dense -> out."""
    tf_keras.utils.set_random_seed(0)
    inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(5, 3, activation="tanh")(inputs)
    x = layers.Conv2D(7, 3, padding="valid")(x)
    x = layers.Activation("elu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(9, activation="relu")(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


def _randomize(model: tf_keras.Model, rng: np.random.Generator) -> None:
    """Nonzero biases and BatchNormalization statistics: what a trained model has."""
    model.set_weights(
        [
            rng.normal(0.5, 0.4, w.shape).astype(np.float32) if w.ndim == 1 else w
            for w in model.get_weights()
        ]
    )
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.moving_variance.assign(np.abs(layer.moving_variance.numpy()) + 0.1)


def _prune(
    model: tf_keras.Model, share: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Unit masks that remove the ``share`` of each unit layer's units of least L1 norm, and
    which units each keeps; the model's kernels masked with them."""
    masks, keep = {}, {}
    for name in unit_layers(model):
        layer = model.get_layer(name)
        kernel = layer.kernel.numpy()
        norms = unit_norms(kernel, 1)
        units = np.ones(norms.size, bool)
        units[np.argsort(norms)[: int(share * norms.size)]] = False
        keep[name] = units
        masks[name] = np.broadcast_to(units, kernel.shape).astype(np.float32)
        layer.kernel.assign(kernel * masks[name])
    return masks, keep


@pytest.mark.parametrize(
    "build", [models.cnn, models.mlp, conv_bn, conv_valid], ids=["cnn", "mlp", "bn", "valid"]
)
@pytest.mark.parametrize("share", [0.25, 0.75])
def test_rebuilt_model_gives_the_masked_models_outputs(
    build: Callable[[], tf_keras.Model], share: float
) -> None:
    rng = np.random.default_rng(1)
    model = build()
    _randomize(model, rng)
    masks, keep = _prune(model, share)
    x = rng.random((32, *model.input_shape[1:])).astype(np.float32)

    small, small_masks = rebuild(model, masks, keep)

    np.testing.assert_allclose(small(x).numpy(), model(x).numpy(), atol=2e-5)
    assert small.count_params() < model.count_params()
    for name in unit_layers(model):
        assert small_masks[name].shape == small.get_layer(name).kernel.shape


def test_units_and_the_next_layers_inputs_shrink_after_flatten() -> None:
    model = models.cnn()
    masks, keep = _prune(model, 0.75)  # 16 -> 4 filters, 128 -> 32 units

    small, _ = rebuild(model, masks, keep)

    shapes = [w.shape for w in small.get_weights()]
    assert shapes == [(3, 3, 1, 4), (4,), (8 * 8 * 4, 32), (32,), (32, 10), (10,)]


def test_a_removed_filter_a_same_padded_conv_cannot_fold_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After BatchNormalization a removed filter gives a nonzero constant; a ``same`` padded
    convolution sees zeros at the border instead, so no bias can stand for it."""
    model = conv_bn()
    _randomize(model, np.random.default_rng(2))
    masks, keep = _prune(model, 0.5)

    conv, norm = model.layers[0], model.layers[1]
    gamma, beta, mean, variance = (w.numpy() for w in norm.weights)
    normalized = gamma * (conv.bias.numpy() - mean) / np.sqrt(variance + norm.epsilon) + beta
    constant = np.maximum(0.0, normalized)
    carrying = int(np.count_nonzero(constant[~keep[conv.name]]))  # relu(BN(bias)) > 0

    small, _ = rebuild(model, masks, keep)

    assert 0 < carrying < 3
    assert small.get_layer(conv.name).filters == 3 + carrying  # the zero ones removed
    assert small.get_layer(model.layers[3].name).filters == 4  # relu(bias) folds into the Dense
    assert f"keeps {carrying} removed unit(s) of {conv.name}" in caplog.text


def test_a_branching_model_is_refused() -> None:
    inputs = layers.Input((4,))
    a, b = layers.Dense(3)(inputs), layers.Dense(3)(inputs)
    model = tf_keras.Model(inputs, layers.Dense(2, activation="softmax")(layers.Add()([a, b])))

    with pytest.raises(ConfigError, match="Add"):
        check_chain(model)


def test_the_output_layer_is_never_a_unit_layer() -> None:
    model = models.cnn()  # Conv2D, Flatten, Dense, Dense (the classes)

    assert unit_layers(model) == [model.layers[0].name, model.layers[2].name]
