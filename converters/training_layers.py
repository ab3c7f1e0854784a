"""The layers a LiteRT training artifact can train, one registry entry each: the layer's forward
step in plain TF ops whose gradients are TFLite builtins (converters/trainable.py says why).

An entry takes the tf_keras layer and its variables and returns a :class:`Step`: the forward
function, the activation that follows it (relu, relu6, tanh, sigmoid and hard_sigmoid carry
hand-written gradients) and, for a layer that trains differently from how it infers
(BatchNormalization), its training forward. A layer it cannot take raises :class:`Unsupported`
with what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

_Fn = Callable[[tf.Tensor], tf.Tensor]


# --- activations: forward op with a gradient made of builtin ops --------------------------------


# relu and relu6 forward as a multiplication by their mask, not RELU/RELU6: the converter fuses
# those into the op before them, and a bias-less layer's BATCH_MATMUL has no fused activation, so
# the relu was silently dropped (measured: a Dense or Conv2D without bias, then ReLU, inferred 0.25
# away from tf_keras).


def _relu_and_grad(x: tf.Tensor) -> tuple[tf.Tensor, _Fn]:
    mask = tf.cast(x > 0, x.dtype)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * mask

    return x * mask, grad


def _tanh_and_grad(x: tf.Tensor) -> tuple[tf.Tensor, _Fn]:
    y = tf.tanh(x)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * (1 - y * y)

    return y, grad


def _sigmoid_and_grad(x: tf.Tensor) -> tuple[tf.Tensor, _Fn]:
    y = tf.sigmoid(x)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * y * (1 - y)

    return y, grad


def _relu6_and_grad(x: tf.Tensor) -> tuple[tf.Tensor, _Fn]:
    inside = tf.cast(tf.logical_and(x > 0, x < 6), x.dtype)
    above = tf.cast(x >= 6, x.dtype)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * inside

    return x * inside + 6.0 * above, grad


def _hard_sigmoid_and_grad(x: tf.Tensor) -> tuple[tf.Tensor, _Fn]:
    """tf_keras 2's hard_sigmoid, ``clip(0.2 * x + 0.5, 0, 1)`` (not Keras 3's
    ``relu6(x + 3) / 6``), with its float32 roundings and clip's gradient: ``0.2 * dy`` wherever
    the clip lets it through, bounds included. tf_keras 2 has no hard-swish: models write it as
    ``Multiply()([x, Activation("hard_sigmoid")(x)])``."""
    z = x * 0.2 + 0.5
    inside = tf.cast(tf.logical_and(z >= 0, z <= 1), x.dtype)
    above = tf.cast(z > 1, x.dtype)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * inside * 0.2

    return z * inside + above, grad


def _linear(x: tf.Tensor) -> tf.Tensor:
    return x


ACTIVATIONS: dict[str, _Fn] = {
    "linear": _linear,
    "relu": tf.custom_gradient(_relu_and_grad),
    "relu6": tf.custom_gradient(_relu6_and_grad),
    "tanh": tf.custom_gradient(_tanh_and_grad),
    "sigmoid": tf.custom_gradient(_sigmoid_and_grad),
    "hard_sigmoid": tf.custom_gradient(_hard_sigmoid_and_grad),
    "softmax": tf.nn.softmax,
}


# --- layers: each becomes an affine/shape part followed by a named activation -------------------


@dataclass(frozen=True)
class Step:
    """One layer as plain TF: ``activation(body(x))``. The softmax of the last step is left to the
    loss, which takes its input as logits. ``train_body`` replaces ``body`` in ``train`` for the
    layers that behave differently in training (BatchNormalization: batch statistics)."""

    body: _Fn
    activation: str
    train_body: _Fn | None = None
    merge: bool = False  # the body takes the list of its inputs (Add, Concatenate, ...)
    # BatchNormalization: its moving mean and variance, and what they would become in one
    # training step at momentum 0 (the batch's statistics)
    moving: tuple[tf.Variable, tf.Variable] | None = None
    moments: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]] | None = None

    def run(self, inputs: list[tf.Tensor], *, training: bool) -> tf.Tensor:
        """The step without its activation, as ``train`` (``training``) or ``infer`` runs it."""
        body = self.train_body if training and self.train_body is not None else self.body
        return body(inputs) if self.merge else body(inputs[0])


class Unsupported(Exception):
    """Raised by a layer builder for a configuration it cannot express; carries the detail."""


Builder = Callable[[Any, list[tf.Variable]], Step]


def activation_name(layer: Any, fn: Any) -> str:
    name = str(getattr(fn, "__name__", ""))
    if name not in ACTIVATIONS or tf_keras.activations.get(name) is not fn:
        raise Unsupported(f"activation {name or fn!r}")
    return name


def _require(layer: Any, **expected: Any) -> None:
    for attr, value in expected.items():
        actual = getattr(layer, attr)
        if actual != value:
            raise Unsupported(f"{attr}={actual!r}")


def _dense(layer: Any, variables: list[tf.Variable]) -> Step:
    """Over the last axis, whatever the rank (a squeeze-and-excite block's [B, 1, 1, C])."""
    kernel, *bias = variables
    units = int(kernel.shape[1])

    def body(x: tf.Tensor) -> tf.Tensor:
        shape = [int(d) for d in x.shape]
        flat = x if len(shape) == 2 else tf.reshape(x, [-1, shape[-1]])
        y = tf.matmul(flat, kernel)
        y = y + bias[0] if bias else y
        return y if len(shape) == 2 else tf.reshape(y, [*shape[:-1], units])

    return Step(body, activation_name(layer, layer.activation))


def _taps(
    x: tf.Tensor,
    size: tuple[int, int],
    strides: tuple[int, int],
    padding: str,
    pad_value: float = 0.0,
) -> list[tf.Tensor]:
    """What each kernel tap sees: ``kh * kw`` tensors shaped [B, out_h, out_w, C], row-major.

    Built from ``tf.pad``, ``tf.slice`` and reshapes only, so the gradient is Pad and Slice:
    strided slicing would need ``StridedSliceGrad`` (Flex). A stride is taken by reshaping a
    contiguous slice to (out, stride) and keeping index 0.
    """
    b, h, w, c = (int(d) for d in x.shape)
    rows = _axis(h, size[0], strides[0], padding)
    cols = _axis(w, size[1], strides[1], padding)
    paddings = [[0, 0], [rows[1], rows[2]], [cols[1], cols[2]], [0, 0]]
    if any(any(p) for p in paddings):
        x = tf.pad(x, paddings, constant_values=pad_value)
    (oh, sh), (ow, sw) = (rows[0], strides[0]), (cols[0], strides[1])
    taps = []
    for i in range(size[0]):
        for j in range(size[1]):
            tap = tf.slice(x, [0, i, j, 0], [b, oh * sh, ow * sw, c])
            if sh > 1:
                tap = tf.reshape(tap, [b * oh, sh, ow * sw * c])
                tap = tf.slice(tap, [0, 0, 0], [b * oh, 1, ow * sw * c])
            if sw > 1:
                tap = tf.reshape(tap, [b * oh * ow, sw, c])
                tap = tf.slice(tap, [0, 0, 0], [b * oh * ow, 1, c])
            taps.append(tf.reshape(tap, [b, oh, ow, c]))
    return taps


def _axis(n: int, k: int, s: int, padding: str) -> tuple[int, int, int]:
    """(output length, padding before, padding after) along one axis, TensorFlow's rules, plus
    enough trailing padding that every tap's slice of ``out * s`` entries fits."""
    if padding == "same":
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        before = total // 2
    else:
        out = (n - k) // s + 1
        before = 0
    after = max((k - 1) + out * s - (n + before), 0)
    return out, before, after


def _window(layer: Any) -> tuple[tuple[int, int], tuple[int, int], str]:
    _require(layer, data_format="channels_last")
    if layer.padding not in ("same", "valid"):
        raise Unsupported(f"padding={layer.padding!r}")
    kh, kw = getattr(layer, "kernel_size", None) or layer.pool_size
    sh, sw = layer.strides
    return (int(kh), int(kw)), (int(sh), int(sw)), str(layer.padding)


def _conv2d(layer: Any, variables: list[tf.Variable]) -> Step:
    _require(layer, dilation_rate=(1, 1), groups=1)
    size, strides, padding = _window(layer)
    kernel, *bias = variables
    kh, kw, cin, cout = (int(d) for d in kernel.shape)

    def body(x: tf.Tensor) -> tf.Tensor:
        taps = _taps(x, size, strides, padding)
        b, oh, ow, _ = (int(d) for d in taps[0].shape)
        patches = tf.concat([tf.reshape(t, [b * oh * ow, cin]) for t in taps], axis=1)
        y = tf.matmul(patches, tf.reshape(kernel, [kh * kw * cin, cout]))
        y = tf.reshape(y, [b, oh, ow, cout])
        return y + bias[0] if bias else y

    return Step(body, activation_name(layer, layer.activation))


def _max_pool(layer: Any, variables: list[tf.Variable]) -> Step:
    size, strides, padding = _window(layer)

    def body(x: tf.Tensor) -> tf.Tensor:
        taps = _taps(x, size, strides, padding, pad_value=float(np.finfo(np.float32).min))
        y = taps[0]
        for tap in taps[1:]:
            y = tf.maximum(y, tap)
        return y

    return Step(body, "linear")


def _average_pool(layer: Any, variables: list[tf.Variable]) -> Step:
    size, strides, padding = _window(layer)

    def body(x: tf.Tensor) -> tf.Tensor:
        # Like TensorFlow, 'same' windows average over the entries inside the input only.
        ones = tf.ones([1, *x.shape[1:3], 1])
        counts = tf.add_n(_taps(ones, size, strides, padding))
        return tf.add_n(_taps(x, size, strides, padding)) / counts

    return Step(body, "linear")


def _flatten(layer: Any, variables: list[tf.Variable]) -> Step:
    _require(layer, data_format="channels_last")
    return Step(lambda x: tf.reshape(x, [x.shape[0], -1]), "linear")


def _reshape(layer: Any, variables: list[tf.Variable]) -> Step:
    target = [int(d) for d in layer.output_shape[1:]]
    return Step(lambda x: tf.reshape(x, [x.shape[0], *target]), "linear")


def _relu_layer(layer: Any, variables: list[tf.Variable]) -> Step:
    if float(layer.negative_slope) or float(layer.threshold):
        raise Unsupported("negative_slope or threshold set")
    if layer.max_value is None:
        return Step(_linear, "relu")
    if float(layer.max_value) == 6.0:
        return Step(_linear, "relu6")
    raise Unsupported(f"max_value={float(layer.max_value):g} (6 or none)")


def _activation(layer: Any, variables: list[tf.Variable]) -> Step:
    return Step(_linear, activation_name(layer, layer.activation))


def _softmax(layer: Any, variables: list[tf.Variable]) -> Step:
    if layer.axis not in (-1, [-1]):
        raise Unsupported(f"axis={layer.axis!r}")
    return Step(_linear, "softmax")


def _identity(layer: Any, variables: list[tf.Variable]) -> Step:
    return Step(_linear, "linear")


def _batch_norm(layer: Any, variables: list[tf.Variable]) -> Step:
    """tf_keras BatchNormalization over the last axis, in both modes.

    Inference (and a layer with ``trainable=False``, which tf_keras always runs in inference
    mode) normalizes with the moving statistics. Training normalizes with the batch's mean and
    biased variance, as ``tf.nn.moments`` computes them, and moves the moving statistics toward
    them by tf_keras's rule ``v -= (v - batch) * (1 - momentum)``; where tf_keras runs the fused
    kernel (``layer.fused``: 4-D input) the variance it moves toward carries Bessel's correction,
    ``n / (n - 1)`` for the n values of a channel in the batch, and so does this one. Mean,
    square, rsqrt and their gradients at a fixed batch size convert to builtins (MEAN,
    SQUARED_DIFFERENCE, RSQRT, TILE).
    """
    _require(layer, renorm=False, virtual_batch_size=None, adjustment=None, synchronized=False)
    rank = len(layer.input_shape)
    if list(layer.axis) != [rank - 1]:
        raise Unsupported(f"axis={list(layer.axis)!r}")
    by_id = {id(w): v for w, v in zip(layer.weights, variables, strict=True)}
    gamma = by_id[id(layer.gamma)] if layer.scale else None
    beta = by_id[id(layer.beta)] if layer.center else None
    moving_mean, moving_var = by_id[id(layer.moving_mean)], by_id[id(layer.moving_variance)]
    epsilon, decay = float(layer.epsilon), 1.0 - float(layer.momentum)
    axes = list(range(rank - 1))

    def normalize(x: tf.Tensor, mean: tf.Tensor, variance: tf.Tensor) -> tf.Tensor:
        # tf.nn.batch_normalization's expression: x * inv + (beta - mean * inv).
        inv = tf.math.rsqrt(variance + epsilon)
        inv = inv * gamma if gamma is not None else inv
        return x * inv + (beta - mean * inv if beta is not None else -mean * inv)

    def infer(x: tf.Tensor) -> tf.Tensor:
        return normalize(x, moving_mean, moving_var)

    def moments(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The batch's mean and biased variance, as tf.nn.moments computes them."""
        mean = tf.reduce_mean(x, axes)
        return mean, tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes)

    def followed(x: tf.Tensor, variance: tf.Tensor) -> tf.Tensor:
        """The variance the moving one follows: Bessel-corrected where tf_keras fuses."""
        n = math.prod(int(d) for d in x.shape[:-1])
        return variance * (n / (n - 1)) if layer.fused and n > 1 else variance

    def train(x: tf.Tensor) -> tf.Tensor:
        mean, variance = moments(x)
        moving_mean.assign_sub((moving_mean - mean) * decay)
        moving_var.assign_sub((moving_var - followed(x, variance)) * decay)
        return normalize(x, mean, variance)

    def statistics(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        mean, variance = moments(x)
        return mean, followed(x, variance)

    return Step(
        infer,
        "linear",
        train if layer.trainable else None,
        moving=(moving_mean, moving_var),
        moments=statistics if layer.trainable else None,
    )


def _depthwise(kernel: tf.Variable, layer: Any) -> _Fn:
    """A depthwise convolution's body: each channel's taps times its own kernel, the
    ``depth_multiplier`` outputs of channel c at c * M + m, as tf_keras orders them."""
    _require(layer, dilation_rate=(1, 1))
    size, strides, padding = _window(layer)
    kh, kw, cin, multiplier = (int(d) for d in kernel.shape)

    if strides == (1, 1) and multiplier == 1 and kh % 2 == 1 and kw % 2 == 1:
        return _depthwise_builtin(kernel, size, padding)

    def body(x: tf.Tensor) -> tf.Tensor:
        taps = _taps(x, size, strides, padding)
        b, oh, ow, _ = (int(d) for d in taps[0].shape)
        # One kernel slice per tap by unstacking (its gradient is a PACK; a strided slice's
        # would be StridedSliceGrad, which no builtin does)
        weights = tf.unstack(tf.reshape(kernel, [kh * kw, cin, multiplier]))
        if multiplier == 1:
            return tf.add_n(
                [tap * tf.reshape(w, [cin]) for tap, w in zip(taps, weights, strict=True)]
            )
        y = tf.add_n([tf.expand_dims(tap, -1) * w for tap, w in zip(taps, weights, strict=True)])
        return tf.reshape(y, [b, oh, ow, cin * multiplier])

    return body


def _depthwise_builtin(kernel: tf.Variable, size: tuple[int, int], padding: str) -> _Fn:
    """A stride-1, multiplier-1 depthwise convolution with an odd kernel as TFLite's own
    DEPTHWISE_CONV_2D forward, with a gradient of builtins: the input's is the same convolution
    of the output's gradient with the kernel flipped (padded for ``valid``), the kernel's each
    tap's view of the input times the output's gradient, summed."""
    kh, kw = size
    cin = int(kernel.shape[2])

    def forward(x: tf.Tensor) -> tuple[tf.Tensor, Callable[..., Any]]:
        y = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], padding.upper())

        def grad(dy: tf.Tensor, variables: list[tf.Variable] | None = None) -> Any:
            flipped = tf.reverse(kernel, [0, 1])
            if padding == "valid":
                dy_full = tf.pad(dy, [[0, 0], [kh - 1, kh - 1], [kw - 1, kw - 1], [0, 0]])
                dx = tf.nn.depthwise_conv2d(dy_full, flipped, [1, 1, 1, 1], "VALID")
            else:
                dx = tf.nn.depthwise_conv2d(dy, flipped, [1, 1, 1, 1], "SAME")
            taps = _taps(x, size, (1, 1), padding)
            dk = tf.stack([tf.reduce_sum(t * dy, axis=[0, 1, 2]) for t in taps])
            return dx, [tf.reshape(dk, [kh, kw, cin, 1])]

        return y, grad

    body: _Fn = tf.custom_gradient(forward)
    return body


def _depthwise_conv2d(layer: Any, variables: list[tf.Variable]) -> Step:
    kernel, *bias = variables
    depthwise = _depthwise(kernel, layer)

    def body(x: tf.Tensor) -> tf.Tensor:
        y = depthwise(x)
        return y + bias[0] if bias else y

    return Step(body, activation_name(layer, layer.activation))


def _separable_conv2d(layer: Any, variables: list[tf.Variable]) -> Step:
    """A depthwise convolution, then a 1x1 convolution over its channels (and the bias)."""
    depthwise_kernel, pointwise, *bias = variables
    depthwise = _depthwise(depthwise_kernel, layer)
    cin, cout = (int(d) for d in pointwise.shape[2:])

    def body(x: tf.Tensor) -> tf.Tensor:
        y = depthwise(x)
        b, oh, ow, _ = (int(d) for d in y.shape)
        y = tf.matmul(tf.reshape(y, [b * oh * ow, cin]), tf.reshape(pointwise, [cin, cout]))
        y = tf.reshape(y, [b, oh, ow, cout])
        return y + bias[0] if bias else y

    return Step(body, activation_name(layer, layer.activation))


def _conv1d(layer: Any, variables: list[tf.Variable]) -> Step:
    """A Conv1D as a Conv2D of one row: the same taps over [B, 1, W, C]."""
    _require(layer, dilation_rate=(1,), groups=1, data_format="channels_last")
    if layer.padding not in ("same", "valid"):
        raise Unsupported(f"padding={layer.padding!r}")
    kernel, *bias = variables
    k, cin, cout = (int(d) for d in kernel.shape)

    def body(x: tf.Tensor) -> tf.Tensor:
        taps = _taps(tf.expand_dims(x, 1), (1, k), (1, int(layer.strides[0])), layer.padding)
        b, _, ow, _ = (int(d) for d in taps[0].shape)
        patches = tf.concat([tf.reshape(t, [b * ow, cin]) for t in taps], axis=1)
        y = tf.reshape(tf.matmul(patches, tf.reshape(kernel, [k * cin, cout])), [b, ow, cout])
        return y + bias[0] if bias else y

    return Step(body, activation_name(layer, layer.activation))


def _global_pool(reduce: Callable[..., tf.Tensor], axes: list[int]) -> Builder:
    def build(layer: Any, variables: list[tf.Variable]) -> Step:
        _require(layer, data_format="channels_last")
        keep = bool(getattr(layer, "keepdims", False))
        return Step(lambda x: reduce(x, axis=axes, keepdims=keep), "linear")

    return build


def _zero_padding2d(layer: Any, variables: list[tf.Variable]) -> Step:
    _require(layer, data_format="channels_last")
    (top, bottom), (left, right) = layer.padding
    paddings = [[0, 0], [int(top), int(bottom)], [int(left), int(right)], [0, 0]]
    return Step(lambda x: tf.pad(x, paddings), "linear")


def _add(layer: Any, variables: list[tf.Variable]) -> Step:
    return Step(tf.add_n, "linear", merge=True)


def _multiply(layer: Any, variables: list[tf.Variable]) -> Step:
    def body(inputs: list[tf.Tensor]) -> tf.Tensor:
        y = inputs[0]
        for x in inputs[1:]:
            y = y * x
        return y

    return Step(body, "linear", merge=True)


def _concatenate(layer: Any, variables: list[tf.Variable]) -> Step:
    if layer.axis not in (-1, len(layer.output_shape) - 1):
        raise Unsupported(f"axis={layer.axis!r} (the last only)")
    return Step(lambda inputs: tf.concat(inputs, axis=-1), "linear", merge=True)


LAYERS: dict[type, Builder] = {
    tf_keras.layers.Dense: _dense,
    tf_keras.layers.Conv2D: _conv2d,
    tf_keras.layers.MaxPooling2D: _max_pool,
    tf_keras.layers.AveragePooling2D: _average_pool,
    tf_keras.layers.Flatten: _flatten,
    tf_keras.layers.Reshape: _reshape,
    tf_keras.layers.ReLU: _relu_layer,
    tf_keras.layers.Activation: _activation,
    tf_keras.layers.Softmax: _softmax,
    tf_keras.layers.Dropout: _identity,  # dropout is off in on-device training
    tf_keras.layers.BatchNormalization: _batch_norm,
    tf_keras.layers.DepthwiseConv2D: _depthwise_conv2d,
    tf_keras.layers.SeparableConv2D: _separable_conv2d,
    tf_keras.layers.GlobalAveragePooling2D: _global_pool(tf.reduce_mean, [1, 2]),
    tf_keras.layers.GlobalMaxPooling2D: _global_pool(tf.reduce_max, [1, 2]),
    tf_keras.layers.Conv1D: _conv1d,
    tf_keras.layers.GlobalAveragePooling1D: _global_pool(tf.reduce_mean, [1]),
    tf_keras.layers.GlobalMaxPooling1D: _global_pool(tf.reduce_max, [1]),
    tf_keras.layers.ZeroPadding2D: _zero_padding2d,
    tf_keras.layers.Add: _add,
    tf_keras.layers.Multiply: _multiply,
    tf_keras.layers.Concatenate: _concatenate,
}
