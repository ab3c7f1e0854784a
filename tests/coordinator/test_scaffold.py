"""SCAFFOLD on the coordinator (scaffold.py, rounds.py, validation.py): the global control
variate c against hand-computed sums, sent with each round, checked when it comes back."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from round_harness import ROUND, Harness, random_delta

from fedprune.coordinator.scaffold import Control
from fedprune.coordinator.validation import Limits, Reason, Rejected, validate
from fedprune.protocol.codec import Model, Update, encode_update
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import Round

MODEL = Model(
    weights=[np.zeros(3, np.float32), np.zeros(2, np.float32)],
    masks=[np.array([1, 0, 1], np.float32), None],
)


def test_c_moves_by_the_sum_of_the_changes_over_the_fleet() -> None:
    control = Control()
    control.payload(MODEL)
    control.add([np.array([3.0, 0.0, 6.0]), np.array([1.0, 1.0])])
    control.add([np.array([0.0, 0.0, 3.0]), np.array([-1.0, 2.0])])

    control.close(MODEL, fleet=3)  # two of three devices reported: c += sum / 3

    np.testing.assert_allclose(control.c[0], [1.0, 0.0, 3.0])
    np.testing.assert_allclose(control.c[1], [0.0, 1.0])


def test_a_pruned_position_of_c_stays_zero_and_a_rebuild_starts_it_again() -> None:
    control = Control()
    control.payload(MODEL)
    control.add([np.array([1.0, 5.0, 1.0]), np.array([1.0, 1.0])])  # 5: where nothing is kept
    control.close(MODEL, fleet=1)
    assert control.c[0][1] == 0.0

    control.reset()
    control.payload(Model(weights=[np.zeros(2, np.float32)], masks=[None]))  # rebuilt smaller
    assert [a.shape for a in control.c] == [(2,)]
    assert not np.any(control.c[0])


def test_after_a_round_a_change_is_clipped_to_a_multiple_of_the_last_median() -> None:
    control = Control(multiple=2.0)
    control.payload(MODEL)
    for scale in (1.0, 1.0, 1.0):  # median norm 1
        control.add([np.array([scale, 0.0, 0.0]), np.zeros(2)])
    control.close(MODEL, fleet=3)
    before = control.c[0].copy()

    control.payload(MODEL)
    control.add([np.array([1000.0, 0.0, 0.0]), np.zeros(2)])  # a stolen device's change
    control.close(MODEL, fleet=4)

    np.testing.assert_allclose(control.c[0] - before, [2.0 / 4, 0.0, 0.0])


def test_its_state_comes_back_and_must_fit() -> None:
    control = Control()
    control.payload(MODEL)
    control.add([np.ones(3), np.ones(2)])
    control.close(MODEL, fleet=1)
    again = Control()
    again.load(control.state(), [(3,), (2,)])
    np.testing.assert_array_equal(again.c[0], control.c[0])
    with pytest.raises(ConfigError, match="does not fit"):
        Control().load(control.state(), [(4,), (2,)])


def _update(control: list[np.ndarray] | None) -> Update:
    return Update(
        round=1, num_samples=5, deltas=[np.ones(3) * MODEL.masks[0], np.ones(2)], control=control
    )  # type: ignore[operator]


def test_a_scaffold_update_must_carry_a_finite_bounded_change_and_others_drop_it() -> None:
    limits = Limits(control=True, max_norm=100.0)
    payload = encode_update(_update(None), MODEL.masks)
    with pytest.raises(Rejected) as refused:
        validate(payload, MODEL, round_=1, limits=limits)
    assert refused.value.reason is Reason.SHAPE
    nan = [np.array([np.nan, 0, 0], np.float32), np.zeros(2, np.float32)]
    with pytest.raises(Rejected, match="NaN"):
        validate(encode_update(_update(nan), MODEL.masks), MODEL, round_=1, limits=limits)
    huge = [np.array([1e3, 0, 0], np.float32), np.zeros(2, np.float32)]
    with pytest.raises(Rejected, match="control change norm"):
        validate(encode_update(_update(huge), MODEL.masks), MODEL, round_=1, limits=limits)
    sent = encode_update(_update(huge), MODEL.masks)
    plain = validate(sent, MODEL, round_=1, limits=dataclasses.replace(limits, control=False))
    assert plain.control is None


def test_a_scaffold_round_sends_c_and_adds_the_devices_changes(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: a SCAFFOLD run of two devices; "a" sends its change, "b" sends none
    h = harness(scaffold=True)
    seen: list[Round] = []

    def answer(announcement: Round, model: Model) -> None:
        seen.append(announcement)
        change = random_delta(model, 7, scale=0.1)
        for name, control in (("a", change), ("b", None)):
            update = Update(
                round=ROUND, num_samples=100, deltas=random_delta(model, 1), control=control
            )
            h.clients[name].send(ROUND, encode_update(update, model.masks))
        answer.change = change  # type: ignore[attr-defined]

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert: c went down with the round (zeros at first); a's change over the fleet of 2
    (announcement,) = seen
    assert announcement.control is not None
    c = h.broker.payload(announcement.control)
    assert all(not np.any(w) for w in c.weights)
    assert (result.reported, result.rejected) == (1, {"shape": 1})
    assert h.coordinator.control is not None
    for got, sent in zip(h.coordinator.control.c, answer.change, strict=True):  # type: ignore[attr-defined]
        np.testing.assert_allclose(got, sent / 2, rtol=1e-6)
