"""Rebuilding a unit-pruned model smaller: the same outputs as the masked model it came from."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import graph_models
import numpy as np
import pytest
import tf_keras
from graph_models import ARCHITECTURES

from fedprune.converters.graph import named as graph_named
from fedprune.coordinator import models
from fedprune.coordinator.structure import Coupling, check, rebuild, unit_layers, unit_norms
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

    small, small_masks, _ = rebuild(model, masks, keep)

    np.testing.assert_allclose(small(x).numpy(), model(x).numpy(), atol=2e-5)
    assert small.count_params() < model.count_params()
    for name in unit_layers(model):
        assert small_masks[name].shape == small.get_layer(name).kernel.shape


def test_units_and_the_next_layers_inputs_shrink_after_flatten() -> None:
    model = models.cnn()
    masks, keep = _prune(model, 0.75)  # 16 -> 4 filters, 128 -> 32 units

    small, _, _ = rebuild(model, masks, keep)

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

    small, _, _ = rebuild(model, masks, keep)

    assert 0 < carrying < 3
    assert small.get_layer(conv.name).filters == 3 + carrying  # the zero ones removed
    assert small.get_layer(model.layers[3].name).filters == 4  # relu(bias) folds into the Dense
    assert f"keeps {carrying} removed unit(s) of {conv.name}" in caplog.text


def _kernel(layer: Any) -> Any:
    """The kernel whose columns are a producer's units."""
    return layer.pointwise_kernel if isinstance(layer, layers.SeparableConv2D) else layer.kernel


def _prune_groups(
    model: tf_keras.Model, share: float
) -> tuple[Coupling, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What the pruner does: remove the ``share`` of each family's groups of least L1 norm, every
    unit of them masked; the coupling, which groups stay, the masks and the units kept."""
    coupling = Coupling(model)
    kernels = {name: _kernel(model.get_layer(name)) for name in coupling.units}
    norms = coupling.norms({name: k.numpy() for name, k in kernels.items()}, 1)
    groups = np.ones(coupling.size, bool)
    for members in coupling.families.values():
        groups[members[np.argsort(norms[members])[: int(share * members.size)]]] = False
    masks, keep = {}, {}
    for name, kernel in kernels.items():
        keep[name] = coupling.producer_kept(name, groups)
        masks[name] = np.broadcast_to(keep[name], kernel.shape).astype(np.float32)
        kernel.assign(kernel.numpy() * masks[name])
    return coupling, groups, masks, keep


def _input(model: tf_keras.Model) -> np.ndarray:
    return np.random.default_rng(3).random((16, *model.input_shape[1:])).astype(np.float32)


@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_coupled_channels_go_together_and_the_rebuilt_graph_gives_the_same_outputs(
    architecture: str, width: int
) -> None:
    tf_keras.utils.set_random_seed(width)
    model = ARCHITECTURES[architecture](width)
    _randomize(model, np.random.default_rng(width))
    coupling, groups, masks, keep = _prune_groups(model, 0.5)
    coupling.silence(groups)  # as the pruner does: removed channels give zero
    x = _input(model)

    small, small_masks, _ = rebuild(model, masks, keep)

    np.testing.assert_allclose(small(x).numpy(), model(x).numpy(), atol=2e-5)
    assert small.count_params() < model.count_params()
    widths = {name: int(g.sum()) for name, g in keep.items()}
    assert {
        name: int(getattr(small.get_layer(name), "filters", 0) or small.get_layer(name).units)
        for name in keep
    } == widths  # every group removed
    left = Coupling(small)
    assert {f: m.size for f, m in left.families.items()} == {
        f: int(groups[m].sum()) for f, m in coupling.families.items()
    }
    for name, mask in small_masks.items():
        assert mask.shape == _kernel(small.get_layer(name)).shape


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_constants_removed_channels_carry_are_folded_or_their_groups_kept(
    architecture: str,
) -> None:
    """Not silenced: removed channels carry what their biases and BatchNormalization give."""
    tf_keras.utils.set_random_seed(5)
    model = ARCHITECTURES[architecture](6)
    _randomize(model, np.random.default_rng(5))
    _, _, masks, keep = _prune_groups(model, 0.5)
    x = _input(model)

    small, _, _ = rebuild(model, masks, keep)

    np.testing.assert_allclose(small(x).numpy(), model(x).numpy(), atol=2e-5)
    assert small.count_params() <= model.count_params()


def test_both_inputs_of_an_add_and_the_shortcut_before_them_are_one_family() -> None:
    model = graph_models.residual(4)
    convs = [layer.name for layer in model.layers if isinstance(layer, layers.Conv2D)]
    stem, _, second, _, _, projection = convs

    families = Coupling(model).families

    assert {frozenset(name.split("+")): g.size for name, g in families.items()} == {
        frozenset({stem, second}): 4,  # the stem (the first shortcut) and the block's last conv
        frozenset({convs[1]}): 4,
        frozenset({convs[3]}): 8,
        frozenset({convs[4], projection}): 8,
    }


def test_a_depthwise_convolution_follows_its_inputs_channels() -> None:
    inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(4, 3, padding="same")(inputs)
    x = layers.DepthwiseConv2D(3, depth_multiplier=3)(x)
    model = tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(layers.Flatten()(x)))

    coupling = Coupling(model)

    assert coupling.size == 4
    np.testing.assert_array_equal(coupling.channels[1], np.repeat(np.arange(4), 3))


def _nested() -> tf_keras.Model:
    inner = tf_keras.Sequential([layers.Input((8, 8, 1)), layers.Conv2D(4, 3)], name="inner")
    inputs = layers.Input((8, 8, 1))
    x = layers.Flatten()(inner(inputs))
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


def _around(layer: Any) -> tf_keras.Model:
    """Conv (4) -> ``layer`` -> Conv (6) -> Flatten -> Dense (8, sigmoid) -> out."""
    tf_keras.utils.set_random_seed(0)
    inputs = layers.Input((8, 8, 1))
    x = layer(layers.Conv2D(4, 3, padding="same", name="first")(inputs))
    x = layers.Flatten()(layers.Conv2D(6, 3, activation="relu", name="second")(x))
    x = layers.Dense(8, activation="sigmoid", name="hidden")(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


@pytest.mark.parametrize(
    ("layer", "why"),
    [
        (layers.LayerNormalization(), "a layer unit pruning does not cut"),
        (layers.Reshape((8, 16, 2)), "it does not keep the channels as its last axis"),
        (layers.BatchNormalization(axis=1), "it does not normalize the last axis"),
        (layers.Softmax(), "a softmax mixes its channels"),
        (layers.Conv2D(4, 1, groups=2), "a grouped convolution"),
    ],
    ids=["layer-norm", "reshape", "batch-norm-axis", "softmax", "grouped"],
)
def test_channels_a_layer_cannot_cut_stay_and_the_rest_is_pruned(
    layer: Any, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fedprune.coordinator")
    model = _around(layer)
    _randomize(model, np.random.default_rng(4))
    check(model)
    coupling, groups, masks, keep = _prune_groups(model, 0.5)
    x = _input(model)

    small, _, _ = rebuild(model, masks, keep)

    assert f"{graph_named(layer)}: {why}" in caplog.text
    assert "first" not in coupling.producers  # next to the layer: its channels stay
    assert small.get_layer("first").filters == 4
    assert small.get_layer("second").filters == 3 and small.get_layer("hidden").units == 4
    np.testing.assert_allclose(small(x).numpy(), model(x).numpy(), atol=2e-5)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_nested, "layer 'inner' \\(Sequential\\) is a nested model"),
        (
            lambda: tf_keras.Sequential(
                [layers.Input((4,)), layers.LayerNormalization(name="norm"), layers.Dense(2)]
            ),
            "finds no channels it can remove in model .* \\(it keeps those around layer 'norm'"
            " \\(LayerNormalization\\): a layer unit pruning does not cut",
        ),
    ],
    ids=["nested", "nothing-to-remove"],
)
def test_what_cannot_be_rebuilt_is_refused_in_one_line(
    build: Callable[[], tf_keras.Model], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        check(build())

    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("unit pruning ")


def test_a_one_channel_gate_stays_apart_when_its_partner_is_down_to_one_channel() -> None:
    """``x * gate(x)`` with a one-channel gate: once x's family is down to one channel, the
    rebuilt merge has two inputs of one channel, and the family keeps its name."""
    tf_keras.utils.set_random_seed(0)
    inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inputs)
    x = layers.Multiply()([x, layers.Conv2D(1, 1, activation="sigmoid", name="gate")(x)])
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3, name="b")(x))
    model = tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))
    coupling, groups, masks, keep = _prune_groups(model, 0.75)
    coupling.silence(groups)

    small, _, _ = rebuild(model, masks, keep)

    assert small.get_layer("a").filters == 1
    assert set(Coupling(small).families) == {"b"}  # "a", down to one channel, is left alone
    assert set(coupling.families) == {"a", "b"}


def test_the_output_layer_is_never_a_unit_layer() -> None:
    model = models.cnn()  # Conv2D, Flatten, Dense, Dense (the classes)

    assert unit_layers(model) == [model.layers[0].name, model.layers[2].name]
