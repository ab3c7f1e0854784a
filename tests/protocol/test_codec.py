"""Sparse model and update payloads: what goes down, what comes back up, and how big it is."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.protocol.codec import (
    Model,
    Update,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
)
from fedprune.protocol.errors import WireError

FLOATS = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def tensors_with_masks(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | None]:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7))
    weight = draw(hnp.arrays(np.float32, shape, elements=FLOATS))
    kind = draw(st.sampled_from(["none", "zeros", "ones", "random"]))
    if kind == "none":
        return weight, None
    if kind == "zeros":
        return weight, np.zeros(shape, np.float32)
    if kind == "ones":
        return weight, np.ones(shape, np.float32)
    return weight, draw(hnp.arrays(np.bool_, shape)).astype(np.float32)


def _model(rng: np.random.Generator, sparsity: float) -> Model:
    """A dense 64x50 kernel with exactly ``sparsity`` of it masked, and an unmasked bias."""
    kernel = rng.normal(size=(64, 50)).astype(np.float32)
    flat = np.ones(kernel.size, np.float32)
    flat[rng.permutation(kernel.size)[: round(kernel.size * sparsity)]] = 0.0
    mask = flat.reshape(kernel.shape)
    bias = rng.normal(size=50).astype(np.float32)
    return Model(weights=[kernel * mask, bias], masks=[mask, None])


@settings(deadline=None)
@given(tensors=st.lists(tensors_with_masks(), min_size=0, max_size=4))
def test_model_round_trip_keeps_kept_values_and_masks(
    tensors: list[tuple[np.ndarray, np.ndarray | None]],
) -> None:
    # Prepare
    model = Model(weights=[w for w, _ in tensors], masks=[m for _, m in tensors])

    # Execute
    decoded = decode_model(encode_model(model))

    # Assert
    assert len(decoded.weights) == len(model.weights)
    for (weight, mask), got_weight, got_mask in zip(
        tensors, decoded.weights, decoded.masks, strict=True
    ):
        assert got_weight.shape == weight.shape
        assert got_weight.dtype == np.float32
        if mask is None:
            assert got_mask is None
            np.testing.assert_array_equal(got_weight, weight)
        else:
            assert got_mask is not None
            np.testing.assert_array_equal(got_mask, mask)
            kept = mask.astype(bool)
            np.testing.assert_array_equal(got_weight[kept], weight[kept])


def test_masked_positions_decode_to_exactly_zero_whatever_was_there() -> None:
    # Prepare
    weight = np.array([[1.5, -2.0, 3.25], [4.0, 5.5, -6.75]], np.float32)
    mask = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
    model = Model(weights=[weight], masks=[mask])

    # Execute
    decoded = decode_model(encode_model(model))

    # Assert
    np.testing.assert_array_equal(
        decoded.weights[0], np.array([[1.5, 0.0, 3.25], [0.0, 0.0, -6.75]], np.float32)
    )
    assert np.signbit(decoded.weights[0][mask == 0]).sum() == 0  # +0.0, not leftovers


def test_an_update_carries_values_only_at_kept_positions() -> None:
    # Prepare
    model = _model(np.random.default_rng(1), sparsity=0.8)
    deltas = [np.full(w.shape, 0.5, np.float32) for w in model.weights]
    update = Update(round=4, num_samples=321, deltas=deltas, metrics={"loss": 0.75})

    # Execute
    payload = encode_update(update, model.masks)

    # Assert
    body = msgpack.unpackb(payload, raw=False)
    assert [len(v) for v in body["values"]] == [4 * 640, 4 * 50]
    assert len(payload) < 4 * (640 + 50) + 100
    assert (body["round"], body["num_samples"], body["metrics"]) == (4, 321, {"loss": 0.75})


def test_an_update_decodes_to_deltas_that_are_zero_where_masked() -> None:
    # Prepare
    model = _model(np.random.default_rng(2), sparsity=0.5)
    deltas = [np.full(w.shape, -0.25, np.float32) for w in model.weights]
    update = Update(round=2, num_samples=60, deltas=deltas, metrics={"accuracy": 0.5})

    # Execute
    decoded = decode_update(encode_update(update, model.masks), model)

    # Assert
    kernel_mask = model.masks[0]
    assert kernel_mask is not None
    np.testing.assert_array_equal(decoded.deltas[0], np.where(kernel_mask == 1, -0.25, 0.0))
    np.testing.assert_array_equal(decoded.deltas[1], np.full(50, -0.25, np.float32))
    assert (decoded.round, decoded.num_samples, decoded.metrics) == (2, 60, {"accuracy": 0.5})


def test_an_update_with_the_wrong_number_of_values_is_a_wire_error() -> None:
    # Prepare
    model = _model(np.random.default_rng(3), sparsity=0.5)
    deltas = [np.ones(w.shape, np.float32) for w in model.weights]
    body = msgpack.unpackb(
        encode_update(Update(round=1, num_samples=5, deltas=deltas), model.masks), raw=False
    )
    body["values"][0] = body["values"][0][:-4]  # one float32 short
    payload = msgpack.packb(body, use_bin_type=True)

    # Execute / Assert
    with pytest.raises(WireError, match="tensor 0: expected 1600 float32 values, got 6396 bytes"):
        decode_update(payload, model)


def test_an_update_with_the_wrong_number_of_tensors_is_a_wire_error() -> None:
    # Prepare
    model = _model(np.random.default_rng(4), sparsity=0.5)
    payload = encode_update(
        Update(round=1, num_samples=5, deltas=[np.ones((64, 50), np.float32)]), model.masks[:1]
    )

    # Execute / Assert
    with pytest.raises(WireError, match="update has 1 tensors, model has 2"):
        decode_update(payload, model)


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", msgpack.packb({"tensors": [{"shape": [2]}]}), msgpack.packb([1, 2])],
    ids=["undecodable", "missing-fields", "not-a-map"],
)
def test_a_garbled_model_payload_is_a_wire_error(payload: bytes) -> None:
    # Execute / Assert
    with pytest.raises(WireError):
        decode_model(payload)


def test_a_model_at_80_percent_sparsity_is_under_30_percent_of_dense_float32() -> None:
    # Prepare
    model = _model(np.random.default_rng(5), sparsity=0.8)
    kernel = model.weights[0]
    dense_bytes = 4 * kernel.size

    # Execute
    sparse_bytes = len(encode_model(Model(weights=[kernel], masks=[model.masks[0]])))

    # Assert
    assert sparse_bytes < 0.3 * dense_bytes
    assert sparse_bytes >= 4 * 640 + kernel.size // 8  # values at kept positions + bitmask
