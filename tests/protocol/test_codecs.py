"""Update codecs: what each one loses, what decoding refuses, and error feedback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedprune.protocol.codec import (
    F32,
    Codec,
    Model,
    Residual,
    Update,
    apply_delta,
    decode_model,
    decode_update,
    default_codec,
    encode_delta,
    encode_model,
    encode_update,
    zstd,
)
from fedprune.protocol.errors import WireError


@pytest.fixture
def model() -> Model:
    """A 60x40 kernel with 80% of it pruned and a dense bias."""
    rng = np.random.default_rng(1)
    mask = (rng.random((60, 40)) < 0.2).astype(np.float32)
    kernel = rng.standard_normal((60, 40)).astype(np.float32) * mask
    return Model(weights=[kernel, np.zeros(40, np.float32)], masks=[mask, None])


def _update(model: Model, seed: int = 2) -> Update:
    rng = np.random.default_rng(seed)
    deltas = [
        (rng.standard_normal(w.shape) * 0.01 * (1 if m is None else m)).astype(np.float32)
        for w, m in zip(model.weights, model.masks, strict=True)
    ]
    return Update(round=3, num_samples=50, deltas=deltas, metrics={"loss": 0.5})


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [("f32", 0.0), ("f16", 1e-3), ("int8", 0.5 / 127), ("int8sr", 1 / 127), ("f16+zstd", 1e-3)],
)
def test_each_value_format_loses_at_most_its_rounding(
    model: Model, name: str, tolerance: float
) -> None:
    update = _update(model)

    back = decode_update(encode_update(update, model.masks, Codec.parse(name)), model)

    assert back.codec == name and (back.round, back.num_samples) == (3, 50)
    for got, want in zip(back.deltas, update.deltas, strict=True):
        peak = float(np.abs(want).max())
        assert np.abs(got - want).max() <= tolerance * peak + 1e-9
    assert np.all(back.deltas[0][model.masks[0] == 0] == 0)  # nothing where the mask prunes


def test_stochastic_rounding_is_unbiased_and_nearest_rounding_is_not() -> None:
    # Prepare: every value sits 0.3 of a step above a step, next to one that sets the scale
    mask = None
    step = np.float32(1 / 127)
    values = np.full(1000, 0.3 * step, np.float32)
    values[0] = 1.0
    model = Model(weights=[np.zeros(1000, np.float32)], masks=[mask])
    update = Update(round=1, num_samples=1, deltas=[values])

    # Execute
    nearest = decode_update(encode_update(update, [mask], Codec.parse("int8")), model)
    draws = [
        decode_update(
            encode_update(update, [mask], Codec.parse("int8sr"), rng=np.random.default_rng(s)),
            model,
        ).deltas[0][1:]
        for s in range(20)
    ]

    # Assert
    assert np.all(nearest.deltas[0][1:] == 0)
    assert np.mean(draws) == pytest.approx(0.3 * step, rel=0.05)


def test_top_k_sends_the_largest_kept_values_and_a_bitmask_of_where(model: Model) -> None:
    update = _update(model)
    kept = update.deltas[0][model.masks[0] == 1]

    payload = encode_update(update, model.masks, Codec.parse("f32+top0.1"))
    back = decode_update(payload, model)

    sent = back.deltas[0][model.masks[0] == 1]
    k = int(np.ceil(0.1 * kept.size))
    assert np.count_nonzero(sent) == k
    assert set(np.flatnonzero(sent)) == set(np.argsort(-np.abs(kept))[:k])
    np.testing.assert_array_equal(sent[sent != 0], kept[sent != 0])
    assert len(payload) < 0.25 * len(encode_update(update, model.masks))


def test_the_best_combination_is_more_than_twenty_times_smaller_than_dense_float32(
    model: Model,
) -> None:
    update = _update(model)
    dense = 4 * sum(w.size for w in model.weights)

    payload = encode_update(update, model.masks, Codec.parse("int8+top0.1+zstd"))

    assert dense / len(payload) > 20


def test_codec_names_round_trip_and_bad_ones_say_what_is_allowed() -> None:
    for name in ("f32", "f16", "int8", "int8sr+top0.05", "int8+top0.1+zstd", "f16+zstd"):
        assert Codec.parse(name).name == name
    assert Codec.parse("f32") == F32 and not F32.lossy and Codec.parse("f16").lossy
    assert Codec.parse("int8+top0.1+zstd").features() == {"int8", "topk", "zstd"}
    with pytest.raises(ValueError, match="unknown codec part 'gzip'.*parts: f32"):
        Codec.parse("int8+gzip")
    with pytest.raises(ValueError, match="unknown codec part 'top2'"):
        Codec.parse("top2")


def test_a_profile_picks_stronger_compression_for_a_slower_uplink() -> None:
    assert default_codec(100_000).name == "f16"
    assert default_codec(20_000).name == "int8"
    assert default_codec(2_000).name == "int8+top0.1+zstd"


def _tensors(model: Model, codec: str) -> dict[str, object]:
    """A valid update body of ``codec``, as a map to tamper with."""
    body = msgpack.unpackb(encode_update(_update(model), model.masks, Codec.parse(codec)))
    assert isinstance(body, dict)
    return body


@pytest.mark.parametrize(
    ("codec", "tamper", "error"),
    [
        ("int8+top0.1", lambda t: t.update(sel=t["sel"][:-1]), "top-k bitmask must be"),
        ("int8+top0.1", lambda t: t.update(sel=b"\xff" * len(t["sel"])), r"expected \d+ int8"),
        ("int8", lambda t: t.update(q=t["q"] + b"\x00"), r"expected \d+ int8 values"),
        ("int8", lambda t: t.update(s=float("nan")), "scale nan is not a finite"),
        ("int8", lambda t: t.update(s=-1.0), "scale -1.0 is not a finite"),
        ("f16", lambda t: t.update(q="text"), r"expected \d+ f16 values"),
        ("f16", lambda t: t.clear(), "'sel'"),
    ],
)
def test_a_malformed_tensor_is_refused(
    model: Model, codec: str, tamper: object, error: str
) -> None:
    body = _tensors(model, codec)
    tamper(body["tensors"][0])  # type: ignore[index, operator]

    with pytest.raises(WireError, match=error):
        decode_update(msgpack.packb(body), model)


def test_an_unknown_codec_and_a_compressed_payload_that_grows_too_far_are_refused(
    model: Model,
) -> None:
    body = _tensors(model, "int8")
    body["codec"] = "int4"
    with pytest.raises(WireError, match="unknown codec part 'int4'"):
        decode_update(msgpack.packb(body), model)
    bomb = zstd.compress(b"\x00" * (8 * 2440 + 2**20 + 1))  # past 8 bytes a weight + 1 MiB
    assert len(bomb) < 1000
    with pytest.raises(WireError, match="grows past"):
        decode_update(bomb, model)
    with pytest.raises(WireError, match="undecodable zstandard"):
        decode_update(bomb[:20], model)


def test_error_feedback_loses_nothing_it_only_sends_it_later(model: Model) -> None:
    # Prepare: five updates through top-10% int8, the residual carried from one to the next
    codec = Codec.parse("int8+top0.1")
    residual = Residual()
    key = "session-1"
    wanted_total = [np.zeros_like(w) for w in model.weights]
    sent_total = [np.zeros_like(w) for w in model.weights]

    # Execute
    for seed in range(5):
        update = _update(model, seed)
        wanted = residual.add(update.deltas, key)
        payload = encode_update(Update(round=1, num_samples=1, deltas=wanted), model.masks, codec)
        sent = decode_update(payload, model).deltas
        residual.keep(wanted, sent, key)
        wanted_total = [t + d for t, d in zip(wanted_total, update.deltas, strict=True)]
        sent_total = [t + s for t, s in zip(sent_total, sent, strict=True)]

    # Assert: what was sent plus what is still held is what training produced
    for w, s, r in zip(wanted_total, sent_total, residual.values, strict=True):
        np.testing.assert_allclose(s + r, w, atol=1e-6)
    fresh = _update(model).deltas
    for got, want in zip(residual.add(fresh, "session-2"), fresh, strict=True):
        np.testing.assert_array_equal(got, want)  # a new session: nothing carried over


def test_a_residual_is_dropped_where_a_new_mask_prunes(model: Model) -> None:
    residual = Residual()
    update = _update(model)
    ones = [np.ones_like(d) for d in update.deltas]
    residual.keep(ones, [np.zeros_like(d) for d in update.deltas], "s")
    mask = np.zeros_like(update.deltas[0])
    mask[0, :5] = 1

    got = residual.add([np.zeros_like(d) for d in update.deltas], "s", [mask, None])

    np.testing.assert_array_equal(got[0], mask)
    np.testing.assert_array_equal(got[1], 1.0)


def test_a_residual_survives_a_restart_and_a_broken_file_is_an_empty_one(
    model: Model, tmp_path: Path
) -> None:
    residual = Residual()
    update = _update(model)
    residual.keep(update.deltas, [np.zeros_like(d) for d in update.deltas], "s1/abc")
    residual.save(tmp_path / "r.npz")
    (tmp_path / "broken.npz").write_bytes(b"no")

    loaded = Residual.load(tmp_path / "r.npz")

    assert loaded.key == "s1/abc"
    for got, want in zip(loaded.values, update.deltas, strict=True):
        np.testing.assert_array_equal(got, want)
    assert Residual.load(tmp_path / "broken.npz").values == []
    assert Residual.load(tmp_path / "missing.npz").values == []


def test_a_model_change_rebuilds_the_new_mask_and_is_refused_when_malformed(model: Model) -> None:
    # Prepare: the next model prunes half of what was kept and moves the rest a little
    rng = np.random.default_rng(3)
    mask = model.masks[0] * (rng.random(model.masks[0].shape) < 0.5)  # type: ignore[operator]
    new = Model(
        weights=[(model.weights[0] + 0.01) * mask, model.weights[1] + 0.5], masks=[mask, None]
    )

    # Execute
    delta = encode_delta(model, new, Codec.parse("int8"))
    rebuilt = apply_delta(model, delta)

    # Assert: the new mask, zeros where it prunes, the rest within int8 rounding
    np.testing.assert_array_equal(rebuilt.masks[0], mask)
    assert np.all(rebuilt.weights[0][mask == 0] == 0)
    np.testing.assert_allclose(rebuilt.weights[1], new.weights[1], atol=0.5 / 127 * 0.51)
    body = msgpack.unpackb(delta)
    body["tensors"][0]["mask"] = body["tensors"][0]["mask"][:-1]
    with pytest.raises(WireError, match="the mask must be 300 bytes"):
        apply_delta(model, msgpack.packb(body))
    body["tensors"] = body["tensors"][:1]
    with pytest.raises(WireError, match="a delta of 1 tensors for 2"):
        apply_delta(model, msgpack.packb(body))


def test_a_model_change_in_a_top_k_codec_sends_the_largest_changes_compressed(
    model: Model,
) -> None:
    # Prepare: every kept weight moves, a few of them a lot
    moved = [
        w + 0.001 * (1 if m is None else m) for w, m in zip(model.weights, model.masks, strict=True)
    ]
    moved[1][:2] += 1.0
    new = Model(weights=moved, masks=model.masks)

    # Execute
    delta = encode_delta(model, new, Codec.parse("int8+top0.05+zstd"))
    rebuilt = apply_delta(model, delta)

    # Assert: compressed, the two big moves made, the small ones mostly left for later
    assert delta[:4] == b"\x28\xb5\x2f\xfd"
    assert len(delta) < len(encode_delta(model, new, Codec.parse("int8"))) / 4
    np.testing.assert_allclose(rebuilt.weights[1][:2], new.weights[1][:2], atol=0.01)
    assert np.count_nonzero(rebuilt.weights[0] != model.weights[0]) <= 0.05 * 480 + 1


@pytest.mark.parametrize("codec", ["int8", "int8sr", "f16", "int8+top0.1+zstd"])
def test_exact_tensors_travel_in_float32_whatever_the_codec(model: Model, codec: str) -> None:
    # Prepare: the bias plays a BatchNormalization statistic (Model.exact)
    exact = dataclasses.replace(model, exact=frozenset({1}))
    update = _update(exact)
    wanted = dataclasses.replace(update, deltas=[update.deltas[0], update.deltas[1] + 1 / 3])

    # Execute: an update, a model payload and a model delta
    back = decode_update(
        encode_update(wanted, exact.masks, Codec.parse(codec), exact=exact.exact), exact
    )
    shipped = decode_model(encode_model(exact))
    target = dataclasses.replace(
        exact, weights=[w + d for w, d in zip(exact.weights, wanted.deltas, strict=True)]
    )
    rebuilt = apply_delta(shipped, encode_delta(shipped, target, Codec.parse(codec)))

    # Assert: the statistic arrives as sent, every value; the kernel as the codec rounds it
    assert np.array_equal(back.deltas[1], wanted.deltas[1])
    assert not np.array_equal(back.deltas[0], wanted.deltas[0])
    assert shipped.exact == rebuilt.exact == frozenset({1})
    assert np.array_equal(rebuilt.weights[1], target.weights[1])


def test_a_model_naming_an_exact_tensor_it_does_not_have_is_refused(model: Model) -> None:
    body = msgpack.unpackb(encode_model(model))
    body["exact"] = [2]

    with pytest.raises(WireError, match=r"exact tensors \[2\] named in a model of 2"):
        decode_model(msgpack.packb(body, use_bin_type=True))
