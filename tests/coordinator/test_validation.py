"""The checks an update passes before it may touch the global model (coordinator/validation.py)."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import numpy as np
import pytest

from fedprune.coordinator.validation import Limits, Reason, Rejected, validate
from fedprune.protocol.codec import Model, Update, encode_update

ROUND = 4
LIMITS = Limits()


def _model() -> Model:
    """A kernel with half of its entries pruned, and a dense bias."""
    kernel = np.arange(1, 13, dtype=np.float32).reshape(3, 4) / 10
    mask = np.tile(np.array([1, 0, 1, 0], np.float32), (3, 1))
    return Model(weights=[kernel * mask, np.zeros(4, np.float32)], masks=[mask, None])


def _deltas(model: Model, value: float = 0.01) -> list[np.ndarray]:
    return [
        np.full(w.shape, value, np.float32) * (1 if m is None else m)
        for w, m in zip(model.weights, model.masks, strict=True)
    ]


def _payload(
    model: Model,
    *,
    round_: int = ROUND,
    num_samples: int = 32,
    deltas: list[np.ndarray] | None = None,
    masks: list[np.ndarray | None] | None = None,
) -> bytes:
    update = Update(
        round=round_,
        num_samples=num_samples,
        deltas=deltas or _deltas(model),
        metrics={"loss": 0.5, "n_eval": 8.0},
    )
    return encode_update(update, model.masks if masks is None else masks)


def _with(index: int, value: float) -> Callable[[Model], list[np.ndarray]]:
    def deltas(model: Model) -> list[np.ndarray]:
        out = _deltas(model)
        out[0].flat[index] = value  # index 0 is kept by the mask
        return out

    return deltas


def test_accepts_a_good_update_and_returns_dense_deltas() -> None:
    model = _model()

    update = validate(_payload(model), model, round_=ROUND, limits=LIMITS)

    assert update.round == ROUND and update.num_samples == 32
    assert update.metrics == {"loss": 0.5, "n_eval": 8.0}
    for got, want in zip(update.deltas, _deltas(model), strict=True):
        np.testing.assert_array_equal(got, want)


CASES: dict[str, tuple[Callable[[Model], bytes], Limits, Reason]] = {
    "wrong round": (lambda m: _payload(m, round_=ROUND + 1), LIMITS, Reason.ROUND),
    "earlier round": (lambda m: _payload(m, round_=ROUND - 1), LIMITS, Reason.ROUND),
    "nan": (lambda m: _payload(m, deltas=_with(0, float("nan"))(m)), LIMITS, Reason.NONFINITE),
    "inf": (lambda m: _payload(m, deltas=_with(0, float("-inf"))(m)), LIMITS, Reason.NONFINITE),
    "huge norm": (lambda m: _payload(m, deltas=_with(0, 1e5)(m)), LIMITS, Reason.NORM),
    "zero samples": (lambda m: _payload(m, num_samples=0), LIMITS, Reason.SAMPLES),
    "negative samples": (lambda m: _payload(m, num_samples=-5), LIMITS, Reason.SAMPLES),
    "too many samples": (
        lambda m: _payload(m, num_samples=11),
        Limits(max_samples=10),
        Reason.SAMPLES,
    ),
    "missing tensor": (
        lambda m: _payload(m, deltas=_deltas(m)[:1], masks=m.masks[:1]),
        LIMITS,
        Reason.SHAPE,
    ),
    "extra tensor": (
        lambda m: _payload(
            m, deltas=[*_deltas(m), np.zeros(2, np.float32)], masks=[*m.masks, None]
        ),
        LIMITS,
        Reason.SHAPE,
    ),
    "values at pruned positions": (
        lambda m: _payload(m, masks=[None, None]),
        LIMITS,
        Reason.SHAPE,
    ),
    "oversize": (lambda m: _payload(m), Limits(max_update_bytes=64), Reason.OVERSIZE),
    "garbage bytes": (lambda m: b"\xc1\xc1 not msgpack", LIMITS, Reason.DECODE),
    "msgpack but not an update": (
        lambda m: msgpack.packb({"round": ROUND}),
        LIMITS,
        Reason.DECODE,
    ),
    "empty": (lambda m: b"", LIMITS, Reason.DECODE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rejects_with_the_reason(case: str) -> None:
    make, limits, reason = CASES[case]
    model = _model()

    with pytest.raises(Rejected) as caught:
        validate(make(model), model, round_=ROUND, limits=limits)

    assert caught.value.reason is reason
    assert str(caught.value).startswith(f"{reason.value}: ")


def test_a_norm_just_under_the_limit_passes() -> None:
    model = _model()
    deltas = _with(0, 99.0)(model)
    norm = float(np.sqrt(sum(np.sum(np.square(d, dtype=np.float64)) for d in deltas)))

    update = validate(
        _payload(model, deltas=deltas), model, round_=ROUND, limits=Limits(max_norm=norm * 1.001)
    )

    assert update.deltas[0].flat[0] == 99.0


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"loss": float("nan"), "n_eval": 8.0}, Reason.NONFINITE),
        ({"accuracy": float("inf"), "n_eval": 8.0}, Reason.NONFINITE),
        ({"accuracy": 1.5, "n_eval": 8.0}, Reason.SAMPLES),
        ({"accuracy": 0.5, "n_eval": -1.0}, Reason.SAMPLES),
    ],
)
def test_reported_metrics_must_be_finite_and_in_range(
    metrics: dict[str, float], reason: Reason
) -> None:
    model = _model()
    update = Update(round=ROUND, num_samples=32, deltas=_deltas(model), metrics=metrics)

    with pytest.raises(Rejected) as caught:
        validate(encode_update(update, model.masks), model, round_=ROUND, limits=Limits())

    assert caught.value.reason is reason
