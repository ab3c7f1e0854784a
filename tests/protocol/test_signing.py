"""Signed messages: the receiver checks who sent them (Ed25519, protocol.signing)."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from fedprune.protocol.envelope import decode, encode, receive
from fedprune.protocol.errors import ConfigError, ReplayError, SignatureError
from fedprune.protocol.messages import Offline, Phase, Status
from fedprune.protocol.signing import (
    SigningKey,
    Trust,
    load_signing_key,
    load_verify_key,
    new_keypair,
    seal,
)

COORDINATOR_KEY = SigningKey.generate()
STRANGER_KEY = SigningKey.generate()
TRUST = Trust.of({"coordinator": COORDINATOR_KEY.verify_key})
FINISHED = Status(phase=Phase.FINISHED, round=3, rounds=3)


def test_a_signed_message_from_a_trusted_sender_decodes() -> None:
    envelope = decode(
        encode(FINISHED, run="r", sender="coordinator", signer=COORDINATOR_KEY), TRUST
    )

    assert envelope.signed and envelope.message == FINISHED and envelope.sender == "coordinator"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (encode(FINISHED, run="r", sender="coordinator"), "unsigned message from 'coordinator'"),
        (
            encode(FINISHED, run="r", sender="coordinator", signer=STRANGER_KEY),
            "bad signature on a message from 'coordinator'",
        ),
        (
            encode(Offline(who="pi"), run="r", sender="pi", signer=STRANGER_KEY),
            "no key for sender 'pi'",
        ),
    ],
    ids=["unsigned", "wrong-key", "unknown-sender"],
)
def test_unsigned_wrongly_signed_or_unknown_senders_are_refused(
    payload: bytes, reason: str
) -> None:
    with pytest.raises(SignatureError, match=reason):
        decode(payload, TRUST)


def test_a_signature_covers_every_byte_of_the_envelope() -> None:
    # Prepare: a genuine signed FINISHED whose inner envelope is changed to another run
    outer = msgpack.unpackb(
        encode(FINISHED, run="r", sender="coordinator", signer=COORDINATOR_KEY), raw=False
    )
    inner = msgpack.unpackb(outer["signed"], raw=False)
    inner["run"] = "other-run"
    outer["signed"] = msgpack.packb(inner, use_bin_type=True)

    # Execute / Assert: a replay into another run does not verify
    with pytest.raises(SignatureError, match="bad signature"):
        decode(msgpack.packb(outer, use_bin_type=True), TRUST)


def test_a_signature_covers_the_session_too() -> None:
    # Prepare: a genuine signed FINISHED of session "0002-b" changed to name session "0003-c"
    signed = encode(
        FINISHED, run="r", sender="coordinator", signer=COORDINATOR_KEY, session="0002-b"
    )
    outer = msgpack.unpackb(signed, raw=False)
    inner = msgpack.unpackb(outer["signed"], raw=False)
    inner["session"] = "0003-c"
    outer["signed"] = msgpack.packb(inner, use_bin_type=True)

    # Execute / Assert
    assert decode(signed, TRUST).session == "0002-b"
    with pytest.raises(SignatureError, match="bad signature"):
        decode(msgpack.packb(outer, use_bin_type=True), TRUST)


@pytest.mark.parametrize("signer", [COORDINATOR_KEY, None], ids=["signed", "unsigned"])
def test_a_message_is_received_only_in_the_run_and_session_it_was_made_for(
    signer: SigningKey | None,
) -> None:
    trust = TRUST if signer else Trust()
    payload = encode(FINISHED, run="r", sender="coordinator", signer=signer, session="0002-b")

    # The run and session it was made for, or no session asked
    assert receive(payload, trust, run="r", session="0002-b").message == FINISHED
    assert receive(payload, trust, run="r").message == FINISHED
    # Another run, another session: a replay, refused
    with pytest.raises(ReplayError, match="made for run 'r', not 'other'"):
        receive(payload, trust, run="other", session="0002-b")
    with pytest.raises(ReplayError, match="made for coordinator session '0002-b', not '0003-c'"):
        receive(payload, trust, run="r", session="0003-c")


def test_a_message_older_than_1_10_names_no_session_and_is_taken_in_any() -> None:
    # Prepare: a 1.9 envelope, which has no session field, signed as a 1.9 coordinator signs
    inner = msgpack.unpackb(encode(FINISHED, run="r", sender="coordinator"), raw=False)
    inner["v"] = "1.9"
    body = msgpack.packb(inner, use_bin_type=True)
    outer = {
        "v": "1.9",
        "kind": "signed",
        "signed": body,
        "sig": COORDINATOR_KEY.sign(body).signature,
    }
    payload = msgpack.packb(outer, use_bin_type=True)

    # Execute / Assert: taken; and a 1.10 message without its session is refused
    assert receive(payload, TRUST, run="r", session="0002-b").session == ""
    without = encode(FINISHED, run="r", sender="coordinator", signer=COORDINATOR_KEY)
    with pytest.raises(ReplayError):
        receive(without, TRUST, run="r", session="0002-b")


def test_a_receiver_without_keys_takes_signed_and_unsigned_messages() -> None:
    signed = encode(FINISHED, run="r", sender="coordinator", signer=STRANGER_KEY)
    assert decode(signed).message == FINISHED
    assert decode(encode(FINISHED, run="r", sender="coordinator")).message == FINISHED


def test_key_files_round_trip_and_bad_ones_are_one_line(tmp_path: Path) -> None:
    # Prepare
    new_keypair(tmp_path / "signing.key", tmp_path / "signing.pub")
    (tmp_path / "bad.pub").write_text("not hex\n")

    # Execute
    key = load_signing_key(tmp_path / "signing.key")
    public = load_verify_key(tmp_path / "signing.pub")

    # Assert
    assert key.verify_key == public
    assert (tmp_path / "signing.key").stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="bad.pub: a verify key file holds 64 hex characters"):
        load_verify_key(tmp_path / "bad.pub")
    (tmp_path / "bad.pub").unlink()
    assert dict(Trust.from_folder(tmp_path).keys) == {"signing": public}


def test_a_sealed_signing_key_opens_only_with_its_passphrase(tmp_path: Path) -> None:
    # Prepare: a key sealed with a passphrase from the environment
    path, file = tmp_path / "signing.key", tmp_path / "passphrase"
    new_keypair(path, tmp_path / "signing.pub")
    seed = load_signing_key(path).encode()
    seal(path, {"FEDPRUNE_KEY_PASSPHRASE": "correct horse"})
    file.write_text("correct horse\n")

    # Execute / Assert: the seed is not in the file; the passphrase from the environment or from
    # a file opens it; a wrong or missing one is one line
    assert seed.hex() not in path.read_text() and path.stat().st_mode & 0o077 == 0
    assert load_signing_key(path, {"FEDPRUNE_KEY_PASSPHRASE": "correct horse"}).encode() == seed
    assert load_signing_key(path, {"FEDPRUNE_KEY_PASSPHRASE_FILE": str(file)}).encode() == seed
    with pytest.raises(ConfigError, match="the passphrase does not open this sealed signing key"):
        load_signing_key(path, {"FEDPRUNE_KEY_PASSPHRASE": "wrong"})
    with pytest.raises(ConfigError, match="sealed .* set FEDPRUNE_KEY_PASSPHRASE, or"):
        load_signing_key(path, {})
    with pytest.raises(ConfigError, match="an empty passphrase file"):
        file.write_text("")
        load_signing_key(path, {"FEDPRUNE_KEY_PASSPHRASE_FILE": str(file)})
