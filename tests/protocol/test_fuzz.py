"""Every decoder of network bytes, signed envelopes included, fuzzed: only clean rejections, no
crash, bounded memory.

Each property runs 2,000 generated inputs in the default run (12,000 in all), from arbitrary bytes
and from structured inputs that get past the first checks: msgpack maps shaped like envelopes and
payloads, and valid payloads with bytes flipped.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.protocol.chunks import Reassembler
from fedprune.protocol.codec import (
    Codec,
    Model,
    Update,
    apply_delta,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
)
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.errors import WireError
from fedprune.protocol.messages import Chunk, Kind, Offline
from fedprune.protocol.signing import SigningKey, Trust

# Inputs per fuzz test: 2,000 on the host; scripts/arm64.sh runs 200 under emulation, where the
# same pure-Python decoders cost about 10x as much (four of its five minutes at 2,000).
EXAMPLES = int(os.environ.get("FEDPRUNE_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_ALLOCATION = 8 * 1024 * 1024  # bytes any one decode may allocate for these small inputs

# msgpack values of every kind a hostile peer can send
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

TRUST = Trust.of({"coordinator": SigningKey.generate().verify_key})

MODEL = Model(
    weights=[np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(4, np.float32)],
    masks=[(np.arange(12) % 3 == 0).astype(np.float32).reshape(3, 4), None],
)
UPDATE = encode_update(
    Update(round=2, num_samples=5, deltas=[np.ones((3, 4), np.float32), np.ones(4, np.float32)]),
    MODEL.masks,
)


def _clean(decoder: Callable[[bytes], Any], data: bytes) -> None:
    """``decoder`` returns or raises WireError, and stays within MAX_ALLOCATION."""
    tracemalloc.start()
    try:
        decoder(data)
    except WireError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MAX_ALLOCATION, f"{peak:,} bytes allocated for {len(data)} input bytes"


def _flipped(payload: bytes, positions: list[int], fill: int) -> bytes:
    data = bytearray(payload)
    for position in positions:
        data[position % len(data)] = fill
    return bytes(data)


@FUZZ
@given(st.binary(max_size=512))
def test_envelope_decoding_of_arbitrary_bytes(data: bytes) -> None:
    _clean(decode, data)


@FUZZ
@given(
    st.fixed_dictionaries(
        {
            "v": st.sampled_from(["1.2", "1.9", "1.x", "2.0", 1]) | values,
            "kind": st.sampled_from([k.value for k in Kind]) | values,
            "run": values,
            "sender": values,
            "seq": values,
            "body": st.dictionaries(
                st.sampled_from(
                    [
                        "client_id",
                        "profile",
                        "num_samples",
                        "backend",
                        "phase",
                        "round",
                        "rounds",
                        "deploy",
                        "model",
                        "selected",
                        "deadline",
                        "index",
                        "count",
                        "size",
                        "sha256",
                        "data",
                        "topic",
                        "chunks",
                        "values",
                        "accepted",
                        "reason",
                        "artifact",
                        "artifact_error",
                        "model_json",
                    ]
                )
                | st.text(max_size=6),
                values,
                max_size=8,
            ),
        }
    )
)
def test_every_message_kind_with_hostile_fields(envelope: dict[str, Any]) -> None:
    _clean(decode, msgpack.packb(envelope, use_bin_type=True))


@FUZZ
@given(
    st.binary(max_size=512)
    | st.builds(
        _flipped, st.just(UPDATE), st.lists(st.integers(0, 10_000), max_size=6), st.integers(0, 255)
    )
)
def test_update_payloads(data: bytes) -> None:
    _clean(lambda d: decode_update(d, MODEL), data)


CODED = [
    encode_update(
        Update(
            round=2, num_samples=5, deltas=[np.ones((3, 4), np.float32), np.ones(4, np.float32)]
        ),
        MODEL.masks,
        Codec.parse(name),
    )
    for name in ("f16", "int8+top0.5", "int8sr+zstd")
]


@FUZZ
@given(
    st.builds(
        _flipped,
        st.sampled_from(CODED),
        st.lists(st.integers(0, 10_000), max_size=6),
        st.integers(0, 255),
    )
    | st.builds(
        lambda codec, tensors: msgpack.packb(
            {"round": 1, "num_samples": 1, "codec": codec, "tensors": tensors}, use_bin_type=True
        ),
        st.sampled_from(["f16", "int8", "int8+top0.5", "f32+top0.1"]) | values,
        st.lists(
            st.fixed_dictionaries(
                {
                    "sel": st.none() | st.binary(max_size=8) | values,
                    "q": st.binary(max_size=64) | values,
                    "s": st.floats(allow_nan=True) | values,
                }
            ),
            max_size=3,
        ),
    )
)
def test_coded_update_payloads_and_model_changes(data: bytes) -> None:
    _clean(lambda d: decode_update(d, MODEL), data)
    _clean(lambda d: apply_delta(MODEL, d), data)


@FUZZ
@given(
    st.binary(max_size=512)
    | st.builds(
        lambda tensors: msgpack.packb({"tensors": tensors}, use_bin_type=True),
        st.lists(
            st.fixed_dictionaries(
                {
                    "shape": st.lists(st.integers(-5, 2**40), max_size=4) | values,
                    "mask": st.none() | st.binary(max_size=16) | values,
                    "values": st.binary(max_size=64) | values,
                }
            ),
            max_size=3,
        ),
    )
    | st.builds(
        _flipped,
        st.just(encode_model(MODEL)),
        st.lists(st.integers(0, 10_000), max_size=6),
        st.integers(0, 255),
    )
)
def test_model_payloads(data: bytes) -> None:
    _clean(decode_model, data)


@FUZZ
@given(
    st.lists(
        st.builds(
            Chunk,
            index=st.integers(-2, 6),
            count=st.integers(-1, 6),
            size=st.integers(-1, 2**40),
            sha256=st.sampled_from(["a" * 64, "b" * 64]),
            data=st.binary(max_size=40),
        ),
        max_size=12,
    )
)
def test_chunk_sequences_never_hold_more_than_declared(chunks: list[Chunk]) -> None:
    # A reassembler either rejects a chunk or holds at most the declared (and allowed) size.
    assembler = Reassembler(max_size=1_000)
    for chunk in chunks:
        try:
            assembler.add(chunk)
        except WireError:
            break
        assert assembler.held <= 1_000


@FUZZ
@given(
    st.binary(max_size=512)
    | st.builds(
        lambda signed, sig: msgpack.packb(
            {"v": "1.3", "kind": "signed", "signed": signed, "sig": sig}, use_bin_type=True
        ),
        st.binary(max_size=256)
        | st.builds(
            lambda s: encode(s, run="r", sender="coordinator"), st.just(Offline(who="coordinator"))
        ),
        st.binary(min_size=0, max_size=80),
    )
)
def test_signed_envelopes_with_a_trust(data: bytes) -> None:
    _clean(lambda d: decode(d, TRUST), data)
