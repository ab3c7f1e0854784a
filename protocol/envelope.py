"""The envelope around every message: version, run, sender, sequence, an optional signature.

Every message is one msgpack map ``{"v": "<major>.<minor>", "kind": ..., "run": ..., "sender":
..., "seq": ..., "session": ..., "body": {...}}`` (``v`` is :data:`PROTOCOL_VERSION`;
``session``, from 1.10, is the coordinator session the message belongs to or answers, when there
is one); a signed one is wrapped in an outer map of kind ``"signed"`` with the inner bytes and
their Ed25519 signature, so that the signature also binds the message to its run and session.
The major version also appears in the topic (``fedprune/v1/<run>/...``); a message whose major
differs from ours is refused. Every field is checked against its type; nothing is ever pickled.
:func:`receive` is how every reader takes a message: decode, verify, and check the sender.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

from fedprune.protocol.errors import ReplayError, SenderError, VersionError, WireError
from fedprune.protocol.messages import KINDS, Kind, Message
from fedprune.protocol.signing import SigningKey, Trust

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 13
"""Minors only add optional fields and kinds; docs/protocol.md, "Versioning", says what each did."""
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"

SIGNED = "signed"
"""The outer kind of a signed message."""

UNSIGNED = Trust()
"""The trust of a receiver that takes unsigned messages (the demo, tests)."""

SESSION_MINOR = 10
"""The minor from which envelopes name their coordinator session."""

_seq = itertools.count()


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """A decoded message with its routing fields."""

    version: str
    run: str
    sender: str
    seq: int
    message: Message = field(repr=False)
    session: str = ""  # the coordinator session it belongs to or answers (1.10), if any
    signed: bool = False  # carried a signature that the receiver's Trust checked

    @property
    def minor(self) -> int:
        return int(self.version.partition(".")[2])


def encode(
    message: Message,
    *,
    run: str,
    sender: str,
    signer: SigningKey | None = None,
    session: str = "",
) -> bytes:
    """Serialize one message in its envelope, for ``run`` and, when given, coordinator session
    ``session``; with ``signer``, wrapped with its signature."""
    body = {f.name: _plain(getattr(message, f.name)) for f in dataclasses.fields(message)}
    envelope = {
        "v": PROTOCOL_VERSION,
        "kind": message.KIND.value,
        "run": run,
        "sender": sender,
        "seq": next(_seq),
        "body": body,
    }
    if session:
        envelope["session"] = session
    inner: bytes = msgpack.packb(envelope, use_bin_type=True)
    if signer is None:
        return inner
    signed = {
        "v": PROTOCOL_VERSION,
        "kind": SIGNED,
        "signed": inner,
        "sig": signer.sign(inner).signature,
    }
    return msgpack.packb(signed, use_bin_type=True)  # type: ignore[no-any-return]


def receive(
    payload: bytes,
    trust: Trust,
    *,
    sender: str | None = None,
    run: str | None = None,
    session: str | None = None,
) -> Envelope:
    """A message as every reader takes one: decoded, its signature checked against ``trust``;
    with ``sender``, sent as that id (``SenderError`` otherwise: on a device's topic only that
    device may speak, on the coordinator's only the coordinator); with ``run``, made for that
    run, and with ``session``, for that coordinator session (``ReplayError`` otherwise). A
    message older than 1.10 names no session and passes."""
    envelope = decode(payload, trust)
    if sender is not None and envelope.sender != sender:
        raise SenderError(f"sent as {envelope.sender[:64]!r}, expected {sender[:64]!r}")
    if run is not None and envelope.run != run:
        raise ReplayError(f"made for run {envelope.run[:64]!r}, not {run[:64]!r}")
    if session and envelope.minor >= SESSION_MINOR and envelope.session != session:
        raise ReplayError(
            f"made for coordinator session {envelope.session[:32]!r}, not {session[:32]!r}"
        )
    return envelope


def decode(payload: bytes, trust: Trust = UNSIGNED) -> Envelope:
    """Parse and check one message; any problem is a ``WireError`` naming it. A ``trust`` with
    keys also requires the sender's valid signature (``SignatureError`` otherwise)."""
    raw = _map(payload)
    if raw.get("kind") != SIGNED:
        envelope = _envelope(raw)
        trust.check(envelope.sender, None, None)
        return envelope
    signed, signature = raw.get("signed"), raw.get("sig")
    if not isinstance(signed, bytes) or not isinstance(signature, bytes):
        raise WireError("malformed signed message")
    envelope = _envelope(_map(signed))
    trust.check(envelope.sender, signed, signature)
    return dataclasses.replace(envelope, signed=True)


def _plain(value: Any) -> Any:
    """A field's value as msgpack takes it: nested records (alone or in a list) become maps."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _map(payload: bytes) -> dict[Any, Any]:
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable message ({exc or type(exc).__name__})") from exc
    if not isinstance(raw, dict):
        raise WireError("message is not a map")
    version = raw.get("v")
    if not isinstance(version, str):
        raise VersionError(f"unknown protocol version {version!r} (we speak {PROTOCOL_VERSION})")
    major, _, minor = version.partition(".")
    if major != str(PROTOCOL_MAJOR) or not minor.isdigit():
        raise VersionError(f"unknown protocol version {version!r} (we speak {PROTOCOL_VERSION})")
    return raw


def _envelope(raw: dict[Any, Any]) -> Envelope:
    version = str(raw["v"])
    try:
        cls = KINDS[Kind(raw["kind"])]
        message = _build(cls, raw["body"], newer=int(version.partition(".")[2]) > PROTOCOL_MINOR)
        return Envelope(
            version=version,
            run=str(raw["run"]),
            sender=str(raw["sender"]),
            seq=int(raw["seq"]),
            message=message,
            session=_text(raw.get("session", "")),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise WireError(f"malformed message ({exc})") from exc


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _build(cls: type[Any], body: Any, *, newer: bool) -> Any:
    """A message (or nested record) from its msgpack map, every field checked against its type.
    A newer minor may add optional fields: those are dropped, here and in nested records."""
    if not isinstance(body, dict):
        raise WireError(f"malformed message (a {cls.__name__} must be a map)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in body.items():
        if key not in names:
            if newer:
                continue
            raise WireError(f"malformed message (unknown field {key!r} in a {cls.__name__})")
        hint = hints[key]
        nested = next(
            (a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None
        )
        if nested is not None and isinstance(value, dict):
            value = _build(nested, value, newer=newer)  # type: ignore[arg-type]
        elif typing.get_origin(hint) is list and isinstance(value, list):
            (item,) = typing.get_args(hint)
            if dataclasses.is_dataclass(item):
                value = [_build(item, v, newer=newer) for v in value]  # type: ignore[arg-type]
        if not _matches(value, hint):
            raise WireError(
                f"malformed message (field {key!r} of a {cls.__name__} has a wrong type)"
            )
        values[key] = value
    return cls(**values)


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if isinstance(value, bool) and hint is not bool:
        return False
    if hint is float:
        return isinstance(value, int | float)
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return value in {m.value for m in hint}
    return isinstance(value, hint)
