"""SCAFFOLD's bookkeeping on a device (edge_client/control.py through LocalTraining), with the
fake trainer, whose mean gradient after its n-th fit is 0.5 * n everywhere: the correction each
round trains with, the control change its update carries, and the control variate c_i it keeps
(across a restart, started again for other shapes or another run, as the coordinator decoded it
with a lossy codec).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from client_harness import SPEC, AddOneTrainer

from fedprune.edge_client.control import ControlVariate, control_key
from fedprune.edge_client.data import LocalData
from fedprune.edge_client.local_training import LocalTraining
from fedprune.protocol.codec import Model, decode_update
from fedprune.protocol.errors import WireError
from fedprune.protocol.messages import Manifest, Round

RUN = "scaffold-run"
SCAFFOLD = dataclasses.replace(SPEC, scaffold=True)
GRADIENT = AddOneTrainer.GRADIENT


def _round(number: int) -> Round:
    return Round(
        round=number,
        model_version=number,
        deadline=0.0,
        model=Manifest(topic="m", size=0, chunks=1, sha256=""),
        local_epochs=1,
    )


@pytest.fixture
def control(model: Model) -> Model:
    """The round's c: multiples of 0.25 (exact in float32), not zero where the model prunes (the
    device must not correct a pruned weight whatever it is sent)."""
    rng = np.random.default_rng(3)
    weights = [(rng.integers(-8, 8, w.shape) * 0.25).astype(np.float32) for w in model.weights]
    return Model(weights=weights, masks=model.masks)


def _masked(arrays: list[np.ndarray], model: Model) -> list[np.ndarray]:
    return [a * (1 if m is None else m) for a, m in zip(arrays, model.masks, strict=True)]


def _kept(value: float, model: Model) -> list[np.ndarray]:
    """``value`` at every kept position of ``model``, zero where it prunes."""
    return [
        np.full(w.shape, value, np.float32) * (1 if m is None else m)
        for w, m in zip(model.weights, model.masks, strict=True)
    ]


def _trainer(local: LocalTraining) -> AddOneTrainer:
    trainer = local._trainer
    assert isinstance(trainer, AddOneTrainer)
    return trainer


def _equal(a: list[np.ndarray] | None, b: list[np.ndarray]) -> None:
    assert a is not None and len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_two_rounds_correct_by_c_minus_c_i_and_send_the_change_of_c_i(
    model: Model, data: LocalData, control: Model, tmp_path: Path
) -> None:
    # Prepare: no control variate kept yet (c_i = 0)
    file = tmp_path / "control.npz"
    local = LocalTraining("fake", data, run=RUN, control_file=file)

    # Execute
    first = local.train(_round(1), SCAFFOLD, model, None, "s", control)
    second = local.train(_round(2), SCAFFOLD, model, None, "s", control)

    # Assert: round 1 corrects by c and sends c_i = 0.5 (its mean gradient, where kept); round 2
    # corrects by c - 0.5 and sends 1.0 - 0.5; c_i is then 1.0, in the file too
    half, one = _kept(GRADIENT, model), _kept(2 * GRADIENT, model)
    corrections = _trainer(local).corrections
    _equal(corrections[0], _masked(control.weights, model))
    _equal(
        corrections[1], _masked([c - h for c, h in zip(control.weights, half, strict=True)], model)
    )
    _equal(first.update.control, half)
    _equal(second.update.control, half)
    _equal(decode_update(second.payload, model).control, half)
    _equal(ControlVariate(file).of(control_key(RUN, SCAFFOLD), model), one)


def test_the_control_variate_survives_a_restart(
    model: Model, data: LocalData, control: Model, tmp_path: Path
) -> None:
    # Prepare: a round trained and kept, then the device restarts (a new LocalTraining)
    file = tmp_path / "control.npz"
    LocalTraining("fake", data, run=RUN, control_file=file).train(
        _round(1), SCAFFOLD, model, None, "s", control
    )
    restarted = LocalTraining("fake", data, run=RUN, control_file=file)

    # Execute
    trained = restarted.train(_round(2), SCAFFOLD, model, None, "s", control)

    # Assert: corrected by c - 0.5, the c_i kept; its first fit's gradient is 0.5 again
    half = _kept(GRADIENT, model)
    wanted = [c - h for c, h in zip(control.weights, half, strict=True)]
    _equal(_trainer(restarted).corrections[0], _masked(wanted, model))
    _equal(trained.update.control, _kept(0.0, model))


@pytest.mark.parametrize("kept_as", ["other shapes", "another run", "another architecture"])
def test_a_control_variate_of_other_shapes_or_another_run_starts_from_zeros(
    model: Model, data: LocalData, control: Model, tmp_path: Path, kept_as: str
) -> None:
    # Prepare: a c_i of 7s kept under another key, or of another model's shapes
    file = tmp_path / "control.npz"
    sevens = [np.full(w.shape, 7.0, np.float32) for w in model.weights]
    if kept_as == "other shapes":
        ControlVariate(file).keep(control_key(RUN, SCAFFOLD), [s[:5] for s in sevens])
    elif kept_as == "another run":
        ControlVariate(file).keep(control_key("other-run", SCAFFOLD), sevens)
    else:
        other = dataclasses.replace(SCAFFOLD, model_json='{"rebuilt": true}')
        ControlVariate(file).keep(control_key(RUN, other), sevens)
    local = LocalTraining("fake", data, run=RUN, control_file=file)

    # Execute
    trained = local.train(_round(1), SCAFFOLD, model, None, "s", control)

    # Assert: as from c_i = 0
    _equal(_trainer(local).corrections[0], _masked(control.weights, model))
    _equal(trained.update.control, _kept(GRADIENT, model))


def test_a_corrupt_control_file_is_said_and_started_from_zeros(
    model: Model, data: LocalData, control: Model, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    file = tmp_path / "control.npz"
    ControlVariate(file).keep(control_key(RUN, SCAFFOLD), _kept(7.0, model))
    file.write_bytes(file.read_bytes()[:100])  # cut short, as by a full disk

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedprune.client"):
        local = LocalTraining("fake", data, run=RUN, control_file=file)
        trained = local.train(_round(1), SCAFFOLD, model, None, "s", control)

    # Assert
    assert any(
        "control variate" in r.getMessage() and "zeros" in r.getMessage() for r in caplog.records
    )
    _equal(trained.update.control, _kept(GRADIENT, model))
    _equal(ControlVariate(file).of(control_key(RUN, SCAFFOLD), model), _kept(GRADIENT, model))


def test_with_a_lossy_codec_the_device_keeps_c_i_plus_what_the_coordinator_decodes(
    model: Model, data: LocalData, control: Model, tmp_path: Path
) -> None:
    # Prepare: a c_i that int8 top-k cannot carry exactly, and c_i's true new value in round 2
    file = tmp_path / "control.npz"
    rng = np.random.default_rng(8)
    start = [
        rng.normal(0, 1, w.shape).astype(np.float32) * (1 if m is None else m)
        for w, m in zip(model.weights, model.masks, strict=True)
    ]
    ControlVariate(file).keep(control_key(RUN, SCAFFOLD), start)
    spec = dataclasses.replace(SCAFFOLD, codec="int8+top0.3")
    local = LocalTraining("fake", data, run=RUN, control_file=file)

    # Execute
    trained = local.train(_round(1), spec, model, None, "s", control)

    # Assert: the change wanted is c_i's new value less the old; what is kept is the old plus the
    # change as decoded, which is not the new value (the codec dropped and rounded values)
    wanted = [h - s for h, s in zip(_kept(GRADIENT, model), start, strict=True)]
    _equal(trained.update.control, wanted)
    decoded = decode_update(trained.payload, model).control
    assert decoded is not None
    kept = ControlVariate(file).of(control_key(RUN, SCAFFOLD), model)
    _equal(kept, [s + d for s, d in zip(start, decoded, strict=True)])
    new = _kept(GRADIENT, model)
    assert max(float(np.abs(k - n).max()) for k, n in zip(kept, new, strict=True)) > 0.1


def test_a_run_without_scaffold_sends_no_control_and_keeps_none(
    model: Model, data: LocalData, tmp_path: Path
) -> None:
    file = tmp_path / "control.npz"
    local = LocalTraining("fake", data, run=RUN, control_file=file)

    trained = local.train(_round(1), SPEC, model, None, "s")

    assert trained.update.control is None and decode_update(trained.payload, model).control is None
    assert _trainer(local).corrections == [None] and not file.exists()


def test_a_scaffold_round_without_its_control_fails(model: Model, data: LocalData) -> None:
    local = LocalTraining("fake", data, run=RUN)

    with pytest.raises(WireError, match="round 4 of a SCAFFOLD run came without its control"):
        local.train(_round(4), SCAFFOLD, model, None, "s")


def test_a_control_variate_that_is_not_finite_is_not_kept(model: Model, tmp_path: Path) -> None:
    # Prepare: a c_i kept, then a round that diverged
    file = tmp_path / "control.npz"
    variate = ControlVariate(file)
    variate.keep(control_key(RUN, SCAFFOLD), _kept(1.0, model))
    diverged = _kept(1.0, model)
    diverged[0][0, 0] = np.nan

    # Execute
    variate.keep(control_key(RUN, SCAFFOLD), diverged)

    # Assert: the next round, and the next start, begin at zeros
    _equal(variate.of(control_key(RUN, SCAFFOLD), model), _kept(0.0, model))
    _equal(ControlVariate(file).of(control_key(RUN, SCAFFOLD), model), _kept(0.0, model))
