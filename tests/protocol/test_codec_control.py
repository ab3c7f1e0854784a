"""SCAFFOLD's control variate change travels with an update, in the update's codec (1.13)."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.protocol.codec import (
    Codec,
    Model,
    Update,
    decode_update,
    encode_update,
    features,
)
from fedprune.protocol.errors import WireError

MODEL = Model(
    weights=[np.zeros((3, 4), np.float32), np.zeros(4, np.float32)],
    masks=[np.array([[1, 0, 1, 1]] * 3, np.float32), None],
)


def _update(control: bool) -> Update:
    rng = np.random.default_rng(0)
    deltas = [
        rng.normal(size=w.shape).astype(np.float32) * (m if m is not None else 1)
        for w, m in zip(MODEL.weights, MODEL.masks, strict=True)
    ]
    return Update(
        round=3,
        num_samples=10,
        deltas=deltas,
        control=[-2 * d for d in deltas] if control else None,
    )


@pytest.mark.parametrize("codec", ["f32", "f16", "int8", "int8+top0.5+zstd"])
def test_the_control_change_comes_back_in_the_updates_codec(codec: str) -> None:
    if not Codec.parse(codec).features() <= set(features()):
        pytest.skip(f"{codec} is not installed here")
    update = _update(control=True)

    got = decode_update(encode_update(update, MODEL.masks, Codec.parse(codec)), MODEL)

    assert got.control is not None
    tolerance = {"f32": 0, "f16": 1e-2, "int8": 0.05}.get(codec, 0.1)
    for sent, back, mask in zip(update.control or [], got.control, MODEL.masks, strict=True):
        if mask is not None:
            assert not np.any(back[mask == 0])
        if codec.startswith("int8+top"):
            continue  # top-k leaves values out: error feedback's business
        np.testing.assert_allclose(back, sent, atol=tolerance * float(np.abs(sent).max()))


def test_an_update_without_control_has_none_and_a_control_of_another_shape_is_refused() -> None:
    got = decode_update(encode_update(_update(control=False), MODEL.masks), MODEL)
    assert got.control is None

    smaller = Model(weights=MODEL.weights[:1], masks=MODEL.masks[:1])
    payload = encode_update(_update(control=True), MODEL.masks)
    with pytest.raises(WireError, match="tensors"):
        decode_update(payload, smaller)
