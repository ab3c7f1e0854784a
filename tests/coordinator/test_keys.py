"""Revocation takes effect while the run goes on: the devices' keys are read again when their
folder changes or on request (SIGHUP), and a revoked device is neither selected nor heard."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from round_harness import ROUND, RUN, Harness, random_delta, update_payload

from fedprune.coordinator.keys import CHECK_SECONDS, DeviceKeys
from fedprune.protocol.chunks import split
from fedprune.protocol.codec import Model
from fedprune.protocol.envelope import encode
from fedprune.protocol.messages import Round
from fedprune.protocol.signing import SigningKey, new_keypair


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _enrol(folder: Path, *names: str) -> dict[str, SigningKey]:
    """Keys for ``names``, their verify keys in ``folder`` as provisioning writes them."""
    for name in names:
        new_keypair(folder.parent / f"{name}.key", folder / f"{name}.pub")
    return {n: SigningKey(bytes.fromhex((folder.parent / f"{n}.key").read_text())) for n in names}


def test_the_keys_are_read_again_when_the_folder_changes_and_when_asked(tmp_path: Path) -> None:
    folder = tmp_path / "device-keys"
    _enrol(folder, "a", "b")
    clock = Clock()
    keys = DeviceKeys(folder, clock=clock)

    # Unchanged, or not yet due: nothing read
    clock.now += CHECK_SECONDS
    assert keys.reload() is None
    (folder / "b.pub").unlink()
    assert keys.reload() is None  # checked less than CHECK_SECONDS ago
    # Due: b is gone
    clock.now += CHECK_SECONDS
    assert keys.reload() == {"b"}
    assert set(keys.trust.keys) == {"a"}
    # Asked (SIGHUP): read at once, even unchanged
    keys.request()
    assert keys.reload() == set()


def test_an_unreadable_key_keeps_the_keys_in_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "device-keys"
    _enrol(folder, "a", "b")
    keys = DeviceKeys(folder)
    (folder / "b.pub").write_text("not a key\n")
    keys.request()

    with caplog.at_level(logging.ERROR, logger="fedprune.coordinator"):
        assert keys.reload() is None

    assert set(keys.trust.keys) == {"a", "b"}
    assert "kept the devices' verify keys in use" in caplog.text


def test_a_device_revoked_mid_run_is_not_selected_and_what_it_sends_is_dropped(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    # Prepare: a and b enrolled and signing; round 1 counts both
    folder = tmp_path / "device-keys"
    signing = _enrol(folder, "a", "b")
    h = harness()
    h.coordinator.keys = DeviceKeys(folder)
    h.coordinator.intake.trust = h.coordinator.keys.trust

    def answer(announcement: Round, model: Model) -> None:
        for name, seed in (("b", 2), ("a", 1)):  # b sends even when it is not selected
            payload = update_payload(model, random_delta(model, seed), round_=announcement.round)
            session = h.clients[name].session
            chunks = [
                encode(c, run=RUN, sender=name, signer=signing[name], session=session)
                for c in split(payload, max_chunk=1 << 20)
            ]
            h.clients[name].publish(announcement.round, chunks)

    h.on_round(answer)
    first = h.coordinator.run_round(ROUND)
    assert first.reported == 2

    # Execute: `fedprune-provision revoke` deletes b's verify key; the coordinator gets SIGHUP
    (folder / "b.pub").unlink()
    h.coordinator.keys.request()
    second = h.coordinator.run_round(ROUND + 1)

    # Assert: b is not drawn, its update is dropped, and the round did not wait for it
    assert (first.selected, second.selected, second.reported) == (2, 1, 1)
    assert second.rejected == {"signature": 1}
    assert second.seconds < h.coordinator.config.round_timeout
    assert "b" not in h.coordinator.fleet
    np.testing.assert_equal(sorted(h.coordinator.keys.trust.keys), ["a"])
