"""The LiteRT training artifact: builtin ops only, the signature contract, and training steps that
match tf_keras (SGD with momentum, Adam) step for step, masks included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from keras_models import SPARSITY, pruned_then_stripped

from fedprune.converters.strip import load_keras
from fedprune.converters.trainable import SIGNATURES, build_trainable
from fedprune.coordinator import models

pytestmark = pytest.mark.slow

BATCH = 32
LR, MOMENTUM, ADAM_LR = 0.05, 0.9, 0.01
PARITY = 1e-5  # measured: <= 1.2e-6 (weights) and <= 4.8e-7 (losses) over one epoch
# BatchNormalization divides by the batch's deviation, which scales rounding up, and tf_keras runs
# a fused kernel on 4-D inputs: measured <= 1.2e-5 (weights) and <= 3.1e-6 (losses) over one epoch.
PARITY_OF = {"batch-norm": 5e-5, "residual": 5e-5}
Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
layers = tf_keras.layers


@dataclass(frozen=True)
class Case:
    """A model and its training artifact."""

    model: tf_keras.Model
    artifact: bytes
    optimizer: str

    def data(self, x: np.ndarray) -> np.ndarray:
        return x.reshape((-1, *self.model.input_shape[1:]))


class Device:
    """The artifact in one LiteRT interpreter, as a device runs it (no TensorFlow involved)."""

    RESOLVERS = {
        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        "xnnpack": OpResolverType.AUTO,
    }

    def __init__(self, artifact: bytes, resolver: str = "builtin") -> None:
        self.interpreter = Interpreter(
            model_content=artifact, experimental_op_resolver_type=self.RESOLVERS[resolver]
        )
        self.run = {key: self.interpreter.get_signature_runner(key) for key in SIGNATURES}

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.run["set_weights"](**{f"w{i:03d}": w for i, w in enumerate(weights)})

    def set_masks(self, masks: list[np.ndarray | None], weights: list[np.ndarray]) -> None:
        full = [_ones_if_none(m, w.shape) for w, m in zip(weights, masks, strict=True)]
        self.run["set_masks"](**{f"m{i:03d}": m for i, m in enumerate(full)})

    def get_weights(self) -> list[np.ndarray]:
        out = self.run["get_weights"]()
        return [out[f"w{i:03d}"] for i in range(len(out))]

    def train(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(self.run["train"](x=x, y=y)["loss"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        count = -(-len(x) // BATCH)
        padded = np.resize(x, (count * BATCH, *x.shape[1:]))
        probs = [self.run["infer"](x=b)["probs"] for b in np.split(padded, count)]
        return np.concatenate(probs)[: len(x)]


def _tanh_variant(name: str) -> Callable[[], tf_keras.Model]:
    """A preset with tanh instead of relu, for the Adam parity runs. At a relu kink, rounding
    noise can flip a derivative, and Adam's normalised step makes that visible: one of four
    relu-CNN Adam epochs differed by 4.4e-4 (SGD and tanh runs stay below 1.2e-6)."""

    def build() -> tf_keras.Model:
        config = models.build(name).get_config()
        for layer in config["layers"]:
            if layer["config"].get("activation") == "relu":
                layer["config"]["activation"] = "tanh"
        tf_keras.utils.set_random_seed(0)
        return tf_keras.Sequential.from_config(config)

    return build


def _zoo() -> tf_keras.Model:
    """Every supported layer kind and option, in a functional chain."""
    tf_keras.utils.set_random_seed(1)
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(6, (3, 2), strides=(1, 2), padding="same", activation="tanh")(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    x = layers.Conv2D(5, 2, padding="valid", use_bias=False, activation="sigmoid")(x)
    x = layers.AveragePooling2D(2, strides=1, padding="same")(x)
    x = layers.Conv2D(4, 3, strides=2, padding="same")(x)
    x = layers.Activation("relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(12, activation="linear")(x)
    x = layers.Reshape((3, 4))(x)
    x = layers.Reshape((12,))(x)
    x = layers.Dense(10)(x)
    return tf_keras.Model(inputs, layers.Softmax()(x), name="zoo")


def _functional() -> tf_keras.Model:
    """Issue 8's model: a plain chain written with the Functional API."""
    tf_keras.utils.set_random_seed(2)
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(32, activation="relu")(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="functional")


def _batch_normed() -> tf_keras.Model:
    """BatchNormalization after a convolution (4-D: tf_keras runs its fused kernel), frozen
    (``trainable=False``: always inference mode) and after a Dense layer (2-D: plain ops, here
    without beta and with other momentum and epsilon), pruned and stripped."""
    tf_keras.utils.set_random_seed(3)
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(name="bn_conv")(x)
    x = layers.Activation("relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.BatchNormalization(scale=False, trainable=False, name="bn_frozen")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(32, activation="tanh")(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, center=False, name="bn_dense")(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="batch_normed")


def _nested() -> tf_keras.Model:
    """A Sequential holding a Sequential: its layers are flattened into the chain."""
    tf_keras.utils.set_random_seed(4)
    features = tf_keras.Sequential(
        [layers.Input((8, 8, 1)), layers.Conv2D(4, 3, activation="relu"), layers.Flatten()],
        name="features",
    )
    return tf_keras.Sequential(
        [layers.Input((8, 8, 1)), features, layers.Dense(10, activation="softmax")], name="nested"
    )


def _residual() -> tf_keras.Model:
    """ResNet blocks: Conv-BN-ReLU, an identity shortcut, a strided block with a 1x1 projection
    (several consumers of one tensor, Add), global average pooling."""
    tf_keras.utils.set_random_seed(5)
    x = inputs = layers.Input((8, 8, 1))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x)))
    y = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = layers.Conv2D(8, 3, padding="same")(y)
    x = layers.ReLU()(layers.Add()([x, y]))
    y = layers.Conv2D(12, 3, strides=2, padding="same", activation="relu")(x)
    y = layers.Conv2D(12, 3, padding="same", use_bias=False)(y)
    x = layers.Activation("relu")(layers.Add()([layers.Conv2D(12, 1, strides=2)(x), y]))
    x = layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="resnet")


def _mobile() -> tf_keras.Model:
    """MobileNet parts: zero padding, ReLU(6), an inverted residual with a depthwise convolution
    and squeeze-and-excite (Dense on [B, 1, 1, C], Multiply), a depth multiplier, a separable
    convolution, Concatenate, global max pooling."""
    tf_keras.utils.set_random_seed(6)
    x = inputs = layers.Input((8, 8, 1))
    x = layers.ZeroPadding2D(((0, 1), (0, 1)))(x)
    x = layers.ReLU(6.0)(layers.Conv2D(8, 3, strides=2, use_bias=False)(x))
    y = layers.Conv2D(16, 1, activation="relu")(x)
    y = layers.ReLU(max_value=6.0)(layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y))
    se = layers.GlobalAveragePooling2D(keepdims=True)(y)
    y = layers.Multiply()([y, layers.Dense(16, activation="sigmoid")(se)])
    x = layers.Add()([x, layers.Conv2D(8, 1)(y)])
    a = layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same")(x)
    b = layers.SeparableConv2D(6, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalMaxPooling2D()(layers.Concatenate()([layers.ReLU()(a), b]))
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="mobile")


def _sequence() -> tf_keras.Model:
    """The digits as 8 steps of 8 features: Conv1D (same and strided valid), both 1-D global
    poolings, Concatenate."""
    tf_keras.utils.set_random_seed(7)
    x = inputs = layers.Input((8, 8))
    x = layers.Conv1D(12, 3, padding="same", activation="relu")(x)
    x = layers.Conv1D(16, 2, strides=2, use_bias=False, activation="tanh")(x)
    x = layers.Concatenate()([layers.GlobalAveragePooling1D()(x), layers.GlobalMaxPooling1D()(x)])
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="sequence")


BUILDS: dict[str, tuple[Callable[[], tf_keras.Model], str]] = {
    "mlp": (lambda: models.build("mlp"), "sgd"),
    "cnn": (lambda: models.build("cnn"), "sgd"),
    "mlp-tanh-adam": (_tanh_variant("mlp"), "adam"),
    "cnn-tanh-adam": (_tanh_variant("cnn"), "adam"),
    "zoo": (_zoo, "sgd"),
    "functional-stripped": (pruned_then_stripped(_functional), "sgd"),
    "batch-norm": (pruned_then_stripped(_batch_normed), "sgd"),
    "nested": (_nested, "sgd"),
    "residual": (pruned_then_stripped(_residual), "sgd"),
    "mobile": (_mobile, "sgd"),
    "sequence": (_sequence, "sgd"),
    # The MLPerf Tiny presets (coordinator/models.py)
    "resnet8": (lambda: models.build("resnet8"), "sgd"),
    "dscnn": (lambda: models.build("dscnn"), "sgd"),
    "mobilenet": (lambda: models.build("mobilenet"), "sgd"),
}


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    """Artifacts are built lazily, once per module: a test asks for the ones it needs."""
    return _Lazy()


class _Lazy(dict[str, Case]):
    def __missing__(self, key: str) -> Case:
        build, optimizer = BUILDS[key]
        model = build()
        lr = ADAM_LR if optimizer == "adam" else LR
        artifact = build_trainable(
            model, batch_size=BATCH, optimizer=optimizer, learning_rate=lr, momentum=MOMENTUM
        )
        self[key] = Case(model=model, artifact=artifact, optimizer=optimizer)
        return self[key]


def _masks(weights: list[np.ndarray], seed: int = 0) -> list[np.ndarray | None]:
    """Random SPARSITY masks for kernels, None for biases (as in a codec Model)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.random(w.shape) >= SPARSITY).astype(np.float32) if w.ndim >= 2 else None
        for w in weights
    ]


def _masked(weights: list[np.ndarray], masks: list[np.ndarray | None]) -> list[np.ndarray]:
    return [w if m is None else w * m for w, m in zip(weights, masks, strict=True)]


def _epoch(n: int, seed: int) -> list[np.ndarray]:
    """Sample indices of one epoch in full batches, the last one topped up from the start."""
    order = np.random.default_rng(seed).permutation(n)
    count = -(-n // BATCH)
    return list(np.resize(order, count * BATCH).reshape(count, BATCH))


def _keras_steps(
    case: Case,
    weights: list[np.ndarray],
    masks: list[np.ndarray | None],
    batches: list[tuple[np.ndarray, np.ndarray]],
    *,
    training: bool = True,
) -> tuple[list[np.ndarray], list[float]]:
    """The same steps in tf_keras, as edge_client/keras_trainer.py takes them."""
    model = tf_keras.models.clone_model(case.model)
    model.set_weights(weights)
    variables = model.trainable_variables
    if case.optimizer == "adam":
        optimizer: Any = tf_keras.optimizers.Adam(ADAM_LR)
    else:
        optimizer = tf_keras.optimizers.SGD(LR, momentum=MOMENTUM)
    optimizer.build(variables)
    loss_fn = tf_keras.losses.SparseCategoricalCrossentropy()
    index = {id(w): i for i, w in enumerate(model.weights)}
    mask_vars = [tf.constant(_ones_if_none(masks[index[id(v)]], v.shape)) for v in variables]

    @tf.function
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=training))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        for variable, mask in zip(variables, mask_vars, strict=True):
            variable.assign(variable * mask)
        return loss

    losses = [float(step(x, y)) for x, y in batches]
    return model.get_weights(), losses


def _ones_if_none(mask: np.ndarray | None, shape: Any) -> np.ndarray:
    return np.ones(shape, np.float32) if mask is None else mask


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "name",
    ["mlp", "cnn", "zoo", "functional-stripped", "batch-norm", "residual", "mobile", "resnet8"],
)
def test_artifact_holds_builtin_ops_only(cases: dict[str, Case], name: str) -> None:
    artifact = cases[name].artifact

    codes = schema.ModelT.InitFromPackedBuf(artifact, 0).operatorCodes

    builtin = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in codes]
    assert [c.customCode for c in codes if c.customCode] == []
    assert schema.BuiltinOperator.CUSTOM not in builtin
    assert b"Flex" not in artifact
    assert schema.BuiltinOperator.VAR_HANDLE in builtin  # weights are resource variables


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_signatures_follow_the_contract(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    shapes = [w.shape for w in case.model.get_weights()]
    sample = case.model.input_shape[1:]

    device = Device(case.artifact)

    w_names = [f"w{i:03d}" for i in range(len(shapes))]
    m_names = [f"m{i:03d}" for i in range(len(shapes))]
    assert device.interpreter.get_signature_list() == {
        "train": {"inputs": ["x", "y"], "outputs": ["loss"]},
        "infer": {"inputs": ["x"], "outputs": ["probs"]},
        "get_weights": {"inputs": [], "outputs": w_names},
        "set_weights": {"inputs": w_names, "outputs": ["ok"]},
        "set_masks": {"inputs": m_names, "outputs": ["ok"]},
    }
    train_in = device.run["train"].get_input_details()
    assert (tuple(train_in["x"]["shape"]), train_in["x"]["dtype"]) == ((BATCH, *sample), np.float32)
    assert (tuple(train_in["y"]["shape"]), train_in["y"]["dtype"]) == ((BATCH,), np.int64)
    loss = device.run["train"].get_output_details()["loss"]
    assert (tuple(loss["shape"]), loss["dtype"]) == ((), np.float32)
    probs = device.run["infer"].get_output_details()["probs"]
    assert (tuple(probs["shape"]), probs["dtype"]) == ((BATCH, 10), np.float32)
    out = device.run["get_weights"].get_output_details()
    assert [tuple(out[n]["shape"]) for n in w_names] == shapes
    set_in = device.run["set_weights"].get_input_details()
    assert [tuple(set_in[n]["shape"]) for n in w_names] == shapes
    assert device.run["set_weights"](
        **dict(zip(w_names, case.model.get_weights(), strict=True))
    ) == {"ok": 1}


@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        "cnn",
        "zoo",
        "functional-stripped",
        "batch-norm",
        "nested",
        "residual",
        "mobile",
        "sequence",
        "resnet8",
        "dscnn",
        "mobilenet",
    ],
)
def test_infer_matches_keras_after_set_weights(
    cases: dict[str, Case], digits: Digits, name: str
) -> None:
    case = cases[name]
    rng = np.random.default_rng(1)
    weights = [
        w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in case.model.get_weights()
    ]
    keras = tf_keras.models.clone_model(case.model)
    keras.set_weights(weights)
    x = case.data(digits[2])
    device = Device(case.artifact)

    device.set_weights(weights)
    probs = device.predict(x)

    assert np.abs(probs - keras.predict(x, verbose=0)).max() < 1e-4


def test_get_weights_round_trips_what_set_weights_wrote(cases: dict[str, Case]) -> None:
    case = cases["cnn"]
    rng = np.random.default_rng(2)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in case.model.get_weights()]
    device = Device(case.artifact)
    assert _max_diff(device.get_weights(), case.model.get_weights()) == 0.0  # starts at the model

    device.set_weights(weights)

    for got, want in zip(device.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("resolver", ["builtin", "xnnpack"])
@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        "cnn",
        "mlp-tanh-adam",
        "cnn-tanh-adam",
        "zoo",
        "functional-stripped",
        "batch-norm",
        "residual",
        "mobile",
        "sequence",
    ],
)
def test_one_masked_epoch_matches_tf_keras(
    cases: dict[str, Case], digits: Digits, name: str, resolver: str
) -> None:
    # Prepare: the same starting weights, 80% masks and batches on both sides.
    case = cases[name]
    masks = _masks(case.model.get_weights())
    start = _masked(case.model.get_weights(), masks)
    x, y = case.data(digits[0]), digits[1]
    batches = [(x[idx], y[idx]) for idx in _epoch(len(x), seed=3)]
    # The zoo's Dropout is the identity on the device; Keras matches that with training=False.
    want, want_losses = _keras_steps(case, start, masks, batches, training=name != "zoo")
    device = Device(case.artifact, resolver)
    device.set_weights(start)
    device.set_masks(masks, start)

    # Execute
    losses = [device.train(xb, yb) for xb, yb in batches]

    # Assert
    got = device.get_weights()
    assert _max_diff(got, want) < PARITY_OF.get(name, PARITY)
    assert np.abs(np.array(losses) - want_losses).max() < PARITY_OF.get(name, PARITY)
    for weight, mask in zip(got, masks, strict=True):
        if mask is not None:
            assert np.all(weight[mask == 0] == 0.0)


@pytest.mark.parametrize("name", ["resnet8", "mobilenet"])
def test_a_step_of_the_mlperf_presets_matches_tf_keras(
    cases: dict[str, Case], digits: Digits, name: str
) -> None:
    """One step, not an epoch: these deeper presets normalize channels the 80% masks leave nearly
    empty (BatchNormalization divides by their tiny deviation), which amplifies float rounding
    step after step, in tf_keras as here (measured after 1, 2 and 5 steps: resnet8 8.6e-6, 1.8e-5,
    4.3e-5; mobilenet 1.2e-5, 1.5e-4, 7.2e-2)."""
    case = cases[name]
    masks = _masks(case.model.get_weights())
    start = _masked(case.model.get_weights(), masks)
    x, y = case.data(digits[0]), digits[1]
    batches = [(x[idx], y[idx]) for idx in _epoch(len(x), seed=3)[:1]]
    want, want_losses = _keras_steps(case, start, masks, batches)
    device = Device(case.artifact)
    device.set_weights(start)
    device.set_masks(masks, start)

    losses = [device.train(xb, yb) for xb, yb in batches]

    assert _max_diff(device.get_weights(), want) < 1e-4
    assert np.abs(np.array(losses) - want_losses).max() < 1e-5


@pytest.mark.parametrize("name", ["mlp", "mlp-tanh-adam"])
def test_set_weights_starts_a_fresh_optimizer(
    cases: dict[str, Case], digits: Digits, name: str
) -> None:
    case = cases[name]
    start = case.model.get_weights()
    x, y = case.data(digits[0]), digits[1]
    used, fresh = Device(case.artifact), Device(case.artifact)
    for idx in _epoch(len(x), seed=4)[:5]:
        used.train(x[idx], y[idx])  # momentum / Adam moments and step are now non-zero

    used.set_weights(start)
    fresh.set_weights(start)
    for idx in _epoch(len(x), seed=5)[:3]:
        used.train(x[idx], y[idx])
        fresh.train(x[idx], y[idx])

    for a, b in zip(used.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_training_under_an_80_percent_mask_keeps_zeros_and_learns(
    cases: dict[str, Case], digits: Digits
) -> None:
    # Prepare
    case = cases["mlp"]
    masks = _masks(case.model.get_weights(), seed=6)
    start = _masked(case.model.get_weights(), masks)
    x_train, y_train, x_test, y_test = digits
    x_train, x_test = case.data(x_train), case.data(x_test)
    device = Device(case.artifact)
    device.set_weights(start)
    device.set_masks(masks, start)
    before = float(np.mean(np.argmax(device.predict(x_test), axis=1) == y_test))

    # Execute
    for epoch in range(8):
        for idx in _epoch(len(x_train), seed=10 + epoch):
            device.train(x_train[idx], y_train[idx])

    # Assert
    weights = device.get_weights()
    accuracy = float(np.mean(np.argmax(device.predict(x_test), axis=1) == y_test))
    assert before < 0.3
    assert accuracy > 0.85
    for weight, mask in zip(weights, masks, strict=True):
        if mask is not None:
            assert np.all(weight[mask == 0] == 0.0)
            assert np.count_nonzero(weight == 0) / weight.size >= SPARSITY - 0.01
            assert np.count_nonzero(weight[mask == 1]) == np.count_nonzero(mask)


def test_functional_model_stripped_of_pruning_wrappers_trains_on_the_device(
    cases: dict[str, Case], digits: Digits
) -> None:
    # Prepare: issue 8's model as the coordinator hands it over (wrapped by TF-MOT, stripped).
    case = cases["functional-stripped"]
    x_train, y_train, x_test, _ = digits
    device = Device(case.artifact)
    batches = _epoch(len(x_train), seed=7)

    # Execute
    probs = device.predict(x_test)
    losses = [device.train(x_train[idx], y_train[idx]) for idx in batches]

    # Assert
    assert np.abs(probs - case.model.predict(x_test, verbose=0)).max() < 1e-5
    assert losses[0] > 2.0  # ten classes, untrained: about ln(10)
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_functional_model_loaded_from_a_file_builds(
    tmp_path: Path, digits: Digits, suffix: str
) -> None:
    # Prepare
    _functional().save(tmp_path / f"functional{suffix}")
    model = load_keras(tmp_path / f"functional{suffix}")
    x = digits[2]

    # Execute
    device = Device(build_trainable(model, batch_size=BATCH, learning_rate=LR))

    # Assert
    assert _max_diff(device.get_weights(), model.get_weights()) == 0.0
    assert np.abs(device.predict(x) - model.predict(x, verbose=0)).max() < 1e-5


def test_one_sgd_step_with_batch_normalization_matches_train_on_batch(
    cases: dict[str, Case], digits: Digits
) -> None:
    # Prepare: the plain SGD step of Model.fit, moving statistics included.
    case = cases["batch-norm"]
    x, y = digits[0][:BATCH], digits[1][:BATCH]
    keras = tf_keras.models.clone_model(case.model)
    keras.set_weights(case.model.get_weights())
    keras.compile(tf_keras.optimizers.SGD(LR, momentum=MOMENTUM), "sparse_categorical_crossentropy")
    device = Device(case.artifact)

    # Execute
    loss = device.train(x, y)
    want_loss = keras.train_on_batch(x, y)

    # Assert
    got, want = device.get_weights(), keras.get_weights()
    names = [w.name for w in keras.weights]
    moving = [i for i, name in enumerate(names) if "moving_" in name]
    frozen = [i for i, name in enumerate(names) if name.startswith("bn_frozen/")]
    assert len(got) == len(want) == 15  # conv 1, bn_conv 4, bn_frozen 3, dense 2, bn_dense 3, 2
    assert abs(loss - want_loss) < 1e-5
    assert _max_diff(got, want) < 1e-4
    start = case.model.get_weights()
    assert all(np.abs(got[i] - start[i]).max() > 1e-4 for i in moving if i not in frozen)
    assert all(np.array_equal(got[i], start[i]) for i in frozen)
