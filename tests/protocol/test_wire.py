"""Envelope encoding, protocol versions and chunking of large payloads."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune.protocol.chunks import Collector, Reassembler, split
from fedprune.protocol.envelope import (
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    decode,
    encode,
)
from fedprune.protocol.errors import OversizeError, WireError
from fedprune.protocol.messages import (
    Chunk,
    Close,
    Failed,
    Hello,
    Manifest,
    Message,
    Notice,
    Offline,
    Phase,
    Round,
    RoundMetrics,
    Snapshot,
    Spec,
    Status,
    Tally,
)
from fedprune.protocol.telemetry import DeviceRow, Event, Progress, RunInfo

NEWER = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR + 1}"  # a minor version from the future

SNAPSHOT = Snapshot(
    run=RunInfo(
        name="demo",
        session="abc123",
        phase="training",
        round=3,
        rounds=10,
        deadline=1e9 + 60,
        model_version=3,
        sparsity_target=0.8,
        sparsity=0.39,
        started=1e9,
        updated=1e9 + 30,
        config={"model": "cnn", "quorum": 1.0},
        signed=True,
        devices_total=2,
    ),
    progress=Progress(
        round=3,
        started=1e9 + 20,
        deadline=1e9 + 60,
        selected=["a", "b"],
        reported=["a"],
        rejected={"norm": 1},
        bytes_up=1234,
    ),
    rounds=[{"round": 2, "accuracy": 0.9, "rejected": {}}],
    devices=[
        DeviceRow(
            id="a",
            profile="raspberry-pi-4",
            trainer="litert",
            samples=100,
            online=True,
            joined=1e9,
            last_seen=1e9 + 25,
            reported=2,
            train_seconds=0.5,
        ),
        DeviceRow(
            id="b",
            profile="generic-x86-64",
            trainer="keras",
            samples=50,
            online=False,
            joined=1e9,
            last_seen=1e9 + 5,
            rejected=1,
            last_reason="norm: too large",
            model="ab" * 32,
            model_accuracy=0.97,
        ),
    ],
    events=[Event(time=1e9 + 21, kind="reject", text="norm: too large", device="b")],
)

PAYLOAD = bytes(range(256)) * 3

MESSAGES: list[Message] = [
    Hello(client_id="pi-kitchen", profile="raspberry-pi-4", num_samples=1200, backend="keras"),
    Offline(who="pi-kitchen"),
    Status(phase=Phase.TRAINING, round=3, rounds=10),
    Spec(
        model_json='{"class_name": "Sequential", "config": {"layers": []}}',
        input_shape=[28, 28, 1],
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        local_epochs=2,
        batch_size=32,
    ),
    Round(
        round=3,
        model_version=7,
        deadline=1_700_000_123.5,
        selected=["pi-kitchen", "pi-garage"],
        model=Manifest(
            topic="fedprune/v1/demo/model/7",
            size=len(PAYLOAD),
            chunks=2,
            sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        ),
        local_epochs=1,
    ),
    Chunk(
        index=1,
        count=2,
        size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        data=PAYLOAD[384:],
    ),
    RoundMetrics(values={"round": 3, "accuracy": 0.91, "sparsity": 0.5, "clients": ["a", "b"]}),
    Notice(round=3, accepted=False, reason="update norm 1e9 exceeds the limit 100"),
    SNAPSHOT,
    dataclasses.replace(SNAPSHOT, progress=None, devices=[], events=[]),
    Hello(
        client_id="pi-1",
        profile="raspberry-pi-4",
        num_samples=1,
        backend="litert",
        installed="ab" * 32,
        max_payload=131_072,
    ),
    Round(
        round=4,
        model_version=8,
        deadline=0.0,
        local_epochs=1,
        duration=30.0,
        session="0195-ab",
        draw="9f3a",
        cutoff=2**63,
        model=Manifest(topic="t", size=1, chunks=1, sha256="0" * 64),
    ),
    Failed(round=3, reason="MemoryError: out of memory"),
    Tally(
        round=3,
        reported=["pi-1"],
        responded=["pi-1", "pi-2"],
        rejected={"norm": 1},
        bytes_up=123_456,
    ),
    Close(round=3),
]


def _reversion(payload: bytes, version: str) -> bytes:
    raw = msgpack.unpackb(payload, raw=False)
    raw["v"] = version
    return msgpack.packb(raw, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.KIND.value)
def test_every_message_kind_survives_encode_and_decode(message: Message) -> None:
    # Prepare
    payload = encode(message, run="demo", sender="pi-kitchen")

    # Execute
    envelope = decode(payload)

    # Assert
    assert envelope.message == message
    assert type(envelope.message) is type(message)
    assert (envelope.version, envelope.run, envelope.sender) == (
        PROTOCOL_VERSION,
        "demo",
        "pi-kitchen",
    )


def test_decoded_status_phase_is_the_enum_member() -> None:
    # Prepare
    payload = encode(Status(phase=Phase.FINISHED, round=10, rounds=10), run="demo", sender="c")

    # Execute
    message = decode(payload).message

    # Assert
    assert isinstance(message, Status)
    assert message.phase is Phase.FINISHED


def test_sequence_numbers_increase_from_one_message_to_the_next() -> None:
    # Prepare
    offline = Offline(who="pi-kitchen")

    # Execute
    first = decode(encode(offline, run="demo", sender="pi-kitchen")).seq
    second = decode(encode(offline, run="demo", sender="pi-kitchen")).seq

    # Assert
    assert second > first


def test_a_message_of_another_major_version_is_refused() -> None:
    # Prepare
    payload = _reversion(encode(Offline(who="pi-kitchen"), run="demo", sender="x"), "2.0")

    # Execute / Assert
    with pytest.raises(WireError, match=r"protocol version '2\.0'"):
        decode(payload)


def test_a_message_of_a_newer_minor_version_is_accepted() -> None:
    # Prepare
    payload = _reversion(encode(Offline(who="pi-kitchen"), run="demo", sender="x"), "1.7")

    # Execute
    envelope = decode(payload)

    # Assert
    assert envelope.version == "1.7"
    assert envelope.message == Offline(who="pi-kitchen")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\xc1", "undecodable message"),
        (b"\x93\x01", "undecodable message"),
        (msgpack.packb([1, 2, 3]), "not a map"),
        (msgpack.packb("hello"), "not a map"),
        (msgpack.packb({"kind": "hello"}), "protocol version None"),
        (
            msgpack.packb(
                {"v": "1.0", "kind": "gossip", "run": "r", "sender": "s", "seq": 0, "body": {}}
            ),
            "malformed message",
        ),
        (
            msgpack.packb(
                {
                    "v": "1.0",
                    "kind": "offline",
                    "run": "r",
                    "sender": "s",
                    "seq": 0,
                    "body": {"who": "x", "extra": 1},
                }
            ),
            "malformed message",
        ),
    ],
    ids=[
        "reserved-byte",
        "truncated",
        "list",
        "string",
        "no-version",
        "unknown-kind",
        "unknown-field",
    ],
)
def test_garbage_is_a_wire_error(payload: bytes, fragment: str) -> None:
    # Execute / Assert
    with pytest.raises(WireError, match=fragment):
        decode(payload)


@given(payload=st.binary(max_size=64))
def test_arbitrary_bytes_never_raise_anything_but_a_wire_error(payload: bytes) -> None:
    # Execute / Assert
    with contextlib.suppress(WireError):
        decode(payload)


@settings(deadline=None)
@given(
    payload=st.binary(min_size=0, max_size=5000),
    max_chunk=st.integers(min_value=1, max_value=700),
    data=st.data(),
)
def test_chunks_in_any_order_with_duplicates_reassemble_to_the_payload(
    payload: bytes, max_chunk: int, data: st.DataObject
) -> None:
    # Prepare
    chunks = list(split(payload, max_chunk=max_chunk))
    duplicates = data.draw(st.lists(st.sampled_from(chunks), max_size=10), label="duplicates")
    delivery = data.draw(st.permutations(chunks + duplicates), label="delivery")
    assembler = Reassembler(max_size=5000)

    # Execute
    results = [assembler.add(chunk) for chunk in delivery]

    # Assert
    first_arrival: dict[int, int] = {}
    for position, chunk in enumerate(delivery):
        first_arrival.setdefault(chunk.index, position)
    complete_at = max(first_arrival.values())
    assert results[:complete_at] == [None] * complete_at
    assert results[complete_at] == payload
    assert all(len(c.data) <= max_chunk for c in chunks)


def test_an_empty_payload_is_one_empty_chunk() -> None:
    # Execute
    chunks = list(split(b"", max_chunk=100))

    # Assert
    assert [(c.index, c.count, c.size, c.data) for c in chunks] == [(0, 1, 0, b"")]
    assert Reassembler(max_size=0).add(chunks[0]) == b""


def test_a_corrupted_chunk_fails_the_checksum() -> None:
    # Prepare
    first, second = split(PAYLOAD, max_chunk=400)
    corrupted = dataclasses.replace(second, data=b"\x00" + second.data[1:])
    assembler = Reassembler(max_size=10_000)
    assembler.add(first)

    # Execute / Assert
    with pytest.raises(WireError, match="SHA-256"):
        assembler.add(corrupted)


def test_a_payload_over_the_maximum_size_is_refused_at_its_first_chunk() -> None:
    # Prepare
    first = next(split(PAYLOAD, max_chunk=100))
    assembler = Reassembler(max_size=len(PAYLOAD) - 1)

    # Execute / Assert
    with pytest.raises(OversizeError, match=f"payload of {len(PAYLOAD)} bytes exceeds 767"):
        assembler.add(first)


@pytest.mark.parametrize("index", [-1, 8], ids=["negative", "past-the-end"])
def test_a_chunk_index_out_of_range_is_refused(index: int) -> None:
    # Prepare
    chunks = list(split(PAYLOAD, max_chunk=100))
    assert len(chunks) == 8
    stray = dataclasses.replace(chunks[3], index=index)
    assembler = Reassembler(max_size=10_000)
    assembler.add(chunks[0])

    # Execute / Assert
    with pytest.raises(WireError, match=rf"chunk index {index} out of range 0\.\.7"):
        assembler.add(stray)


def test_a_chunk_of_another_payload_is_refused() -> None:
    # Prepare
    ours = next(split(PAYLOAD, max_chunk=100))
    theirs = list(split(PAYLOAD[::-1], max_chunk=100))[1]
    assembler = Reassembler(max_size=10_000)
    assembler.add(ours)

    # Execute / Assert
    with pytest.raises(WireError, match="does not belong"):
        assembler.add(theirs)


def test_split_refuses_a_chunk_size_below_one() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="max_chunk must be >= 1, got 0"):
        list(split(PAYLOAD, max_chunk=0))


def _plain(record: object) -> dict[str, object]:
    return dataclasses.asdict(record)  # type: ignore[call-overload,no-any-return]


def _envelope(kind: str, body: dict[str, object], version: str = "1.1") -> bytes:
    message = {"v": version, "kind": kind, "run": "r", "sender": "s", "seq": 0, "body": body}
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("chunk", {"index": "0", "count": 1, "size": 1, "sha256": "x", "data": b"a"}),
        ("chunk", {"index": True, "count": 1, "size": 1, "sha256": "x", "data": b"a"}),
        ("hello", {"client_id": "c", "profile": ["p"], "num_samples": 1, "backend": "keras"}),
        ("status", {"phase": "finished", "round": 1, "rounds": 1, "deploy": 3}),
        ("status", {"phase": "bogus", "round": 1, "rounds": 1}),
        (
            "round",
            {
                "round": 1,
                "model_version": 1,
                "deadline": "soon",
                "selected": ["a"],
                "model": {"topic": "t", "size": 1, "chunks": 1, "sha256": "x"},
                "local_epochs": 1,
            },
        ),
        (
            "round",
            {
                "round": 1,
                "model_version": 1,
                "deadline": 1.0,
                "selected": 5,
                "model": {"topic": "t", "size": 1, "chunks": 1, "sha256": "x"},
                "local_epochs": 1,
            },
        ),
        (
            "telemetry",
            {
                "run": _plain(SNAPSHOT.run),
                "progress": None,
                "rounds": [],
                "devices": [{"id": "a"}],
                "events": [],
            },
        ),
        (
            "telemetry",
            {
                "run": _plain(SNAPSHOT.run),
                "progress": None,
                "rounds": [],
                "devices": ["a"],
                "events": [],
            },
        ),
        (
            "telemetry",
            {
                "run": _plain(SNAPSHOT.run),
                "progress": None,
                "rounds": [],
                "devices": [],
                "events": [{"time": "now", "kind": "join", "text": ""}],
            },
        ),
    ],
)
def test_a_field_of_the_wrong_type_is_a_wire_error(kind: str, body: dict[str, object]) -> None:
    with pytest.raises(WireError, match="wrong type|malformed"):
        decode(_envelope(kind, body))


def test_a_newer_minor_may_add_fields_to_nested_records_too() -> None:
    body = {
        "round": 1,
        "model_version": 1,
        "deadline": 1.0,
        "selected": ["a"],
        "model": {"topic": "t", "size": 1, "chunks": 1, "sha256": "x", "codec": "zstd"},
        "local_epochs": 1,
        "priority": 3,
    }

    message = decode(_envelope("round", body, version=NEWER)).message

    assert isinstance(message, Round) and message.model.sha256 == "x"


def test_chunks_cannot_carry_more_than_the_declared_size() -> None:
    # A sender declares 10 bytes in 3 chunks, then sends 8 bytes in each.
    digest = hashlib.sha256(b"0123456789").hexdigest()
    chunks = [Chunk(index=i, count=3, size=10, sha256=digest, data=b"x" * 8) for i in range(3)]
    assembler = Reassembler(max_size=1000)
    assembler.add(chunks[0])

    with pytest.raises(WireError, match="more than the declared 10 bytes"):
        assembler.add(chunks[1])


def test_a_newer_minor_may_add_fields_to_records_in_a_list() -> None:
    device = {**_plain(SNAPSHOT.devices[0]), "temperature": 61.5}
    body = {
        "run": _plain(SNAPSHOT.run),
        "progress": None,
        "rounds": [],
        "devices": [device],
        "events": [],
    }

    message = decode(_envelope("telemetry", body, version=NEWER)).message

    assert isinstance(message, Snapshot)
    assert message.devices == [SNAPSHOT.devices[0]]


def test_an_older_hello_without_installed_still_decodes() -> None:
    body = {"client_id": "c", "profile": "p", "num_samples": 1, "backend": "keras"}

    message = decode(_envelope("hello", body, version="1.3")).message

    assert isinstance(message, Hello) and message.installed is None


def test_a_payload_cut_again_into_smaller_chunks_midway_is_still_assembled() -> None:
    # Prepare: the first chunks of a big-chunk copy arrive, then the whole small-chunk copy
    payload = bytes(range(256)) * 40
    big, small = list(split(payload, max_chunk=4096)), list(split(payload, max_chunk=1024))
    collector = Collector()

    # Execute
    results = [collector.add(c) for c in [*big[:2], *small]]

    # Assert: assembled once, from the small chunks
    assert results[-1] == payload
    assert results[:-1] == [None] * (len(results) - 1)
