"""The tf_keras models the LiteRT training artifact is tested on (converters/trainable.py), with
the optimizer each trains with: the presets, and models that gather the layer kinds and graph
shapes the artifact takes.

A test helper, kept out of the installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

from collections.abc import Callable

import tf_keras
from keras_models import pruned_then_stripped

from fedprune.coordinator import models

layers = tf_keras.layers


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


def functional() -> tf_keras.Model:
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


def _wide() -> tf_keras.initializers.Initializer:
    """Kernels wide enough that, under 80% masks, pre-activations reach both flat parts of
    hard_sigmoid (|x| > 2.5): measured 1% to 29% of them on each side, at each hard_sigmoid."""
    return tf_keras.initializers.VarianceScaling(100.0, "fan_in", "normal")


def _hard_sigmoid() -> tf_keras.Model:
    """hard_sigmoid as a layer's activation (Conv2D, Dense) and as an Activation layer."""
    tf_keras.utils.set_random_seed(8)
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, activation="hard_sigmoid", kernel_initializer=_wide())(x)
    x = layers.Conv2D(8, 3, strides=2, padding="same", kernel_initializer=_wide())(x)
    x = layers.Activation("hard_sigmoid")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(16, activation="hard_sigmoid", kernel_initializer=_wide())(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="hard_sigmoid")


def _hard_swish() -> tf_keras.Model:
    """Hard-swish as tf_keras models write it (tf_keras 2 has no hard_swish activation):
    ``Multiply()([x, Activation("hard_sigmoid")(x)])``, after a convolution and a Dense layer."""
    tf_keras.utils.set_random_seed(9)
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", kernel_initializer=_wide())(x)
    x = layers.Multiply()([x, layers.Activation("hard_sigmoid")(x)])
    x = layers.Flatten()(x)
    x = layers.Dense(16, kernel_initializer=_wide())(x)
    x = layers.Multiply()([x, layers.Activation("hard_sigmoid")(x)])
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="hard_swish")


BUILDS: dict[str, tuple[Callable[[], tf_keras.Model], str]] = {
    "mlp": (lambda: models.build("mlp"), "sgd"),
    "cnn": (lambda: models.build("cnn"), "sgd"),
    "mlp-tanh-adam": (_tanh_variant("mlp"), "adam"),
    "cnn-tanh-adam": (_tanh_variant("cnn"), "adam"),
    "zoo": (_zoo, "sgd"),
    "functional-stripped": (pruned_then_stripped(functional), "sgd"),
    "batch-norm": (pruned_then_stripped(_batch_normed), "sgd"),
    "nested": (_nested, "sgd"),
    "residual": (pruned_then_stripped(_residual), "sgd"),
    "mobile": (_mobile, "sgd"),
    "sequence": (_sequence, "sgd"),
    "hard-sigmoid": (_hard_sigmoid, "sgd"),
    "hard-swish": (_hard_swish, "sgd"),
    # The MLPerf Tiny presets (coordinator/models.py)
    "resnet8": (lambda: models.build("resnet8"), "sgd"),
    "dscnn": (lambda: models.build("dscnn"), "sgd"),
    "mobilenet": (lambda: models.build("mobilenet"), "sgd"),
}
"""Name -> (the model's builder, the optimizer its artifact trains with)."""
