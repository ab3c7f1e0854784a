"""Messages on the wire: msgpack-encoded frozen dataclasses in a versioned envelope, and chunking.

Every message is one msgpack map ``{"v": "1.5", "kind": ..., "run": ..., "sender": ...,
"seq": ..., "body": {...}}`` (``v`` is :data:`PROTOCOL_VERSION`). The major version also appears
in the topic (``fedprune/v1/<run>/...``); a message whose major version differs from ours is
refused. Large payloads (models, updates) travel as ``Chunk`` messages that each carry the whole
payload's size, chunk count and SHA-256. Nothing is ever pickled; see docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import msgpack

from fedprune.edge_client.errors import OversizeError, VersionError, WireError
from fedprune.edge_client.signing import SigningKey, Trust
from fedprune.edge_client.telemetry import DeviceRow, Event, Progress, RunInfo

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 9  # 1.1: Deployment, Status.deploy, Spec.artifact; 1.2: Spec.artifact_error;
# 1.3: signed messages (an outer map of kind "signed" around the envelope's bytes);
# 1.4: Telemetry, Hello.installed and Hello.deploys; 1.5: Round.duration, Status.session and
# Round.session, Failed; 1.6: Round.draw and Round.cutoff (a selection of any size in a few
# bytes; Round.selected is no longer sent), Hello.max_payload; 1.7: update codecs (Spec.codec,
# Hello.codecs, an update's "codec" and "tensors", zstandard payloads), Round.delta and base;
# 1.8: Round.architecture (a unit-pruned model is rebuilt smaller and the Spec published again);
# 1.9: Hello.unanswered (an update a device resends for want of a notice), Progress.overdue
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"

ENVELOPE_ROOM = 512
"""Bytes kept free in every publish for the envelope around a chunk's data (and a signature)."""

COORDINATOR = "coordinator"
"""The sender id of every message the coordinator publishes."""

SIGNED = "signed"
"""The outer kind of a signed message."""

UNSIGNED = Trust()
"""The trust of a receiver that takes unsigned messages (the demo, tests)."""

MAX_ASSEMBLED_BYTES = 256 * 1024 * 1024
"""The largest payload a receiver reassembles from chunks: a model, an artifact, a deployment."""


class Kind(StrEnum):
    """What a message is; one dataclass per kind."""

    HELLO = "hello"
    OFFLINE = "offline"
    STATUS = "status"
    SPEC = "spec"
    ROUND = "round"
    CHUNK = "chunk"
    METRICS = "metrics"
    DEPLOY = "deploy"
    NOTICE = "notice"
    TELEMETRY = "telemetry"
    FAILED = "failed"
    TALLY = "tally"
    CLOSE = "close"


class Phase(StrEnum):
    """Coordinator phases published on ``coordinator/status``."""

    WAITING = "waiting"
    TRAINING = "training"
    FINISHED = "finished"
    ABORTED = "aborted"  # the coordinator stopped on an error; clients give up


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of all messages: subclasses set ``KIND`` and add their fields."""

    KIND: ClassVar[Kind]


@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """A client announces itself (retained on ``clients/<id>/status``)."""

    KIND: ClassVar[Kind] = Kind.HELLO
    client_id: str
    profile: str
    num_samples: int
    backend: str
    installed: str | None = None  # SHA-256 of the deployed model it runs (1.4)
    deploys: bool = False  # it installs the model deployed to its profile (1.4)
    max_payload: int = 0  # the largest message it takes (1.6; its profile's): 0 = any
    codecs: list[str] = field(default_factory=lambda: ["f32"])  # the codec parts it can use (1.7)
    unanswered: Unanswered | None = None  # the update it resends for want of a notice (1.9)


@dataclass(frozen=True, kw_only=True)
class Unanswered:
    """An update a device sent in ``session``'s ``round`` (payload SHA-256 ``sha256``) without a
    notice from the coordinator since: it has sent it ``resends`` more times. A coordinator that
    has not received it shows it as overdue: a sign that the broker loses messages."""

    session: str
    round: int
    sha256: str
    resends: int


@dataclass(frozen=True, kw_only=True)
class Offline(Message):
    """Last will of a client or of the coordinator."""

    KIND: ClassVar[Kind] = Kind.OFFLINE
    who: str


@dataclass(frozen=True, kw_only=True)
class Status(Message):
    """Coordinator status (retained); its last will is an ``Offline``."""

    KIND: ClassVar[Kind] = Kind.STATUS
    phase: Phase
    round: int
    rounds: int
    deploy: list[str] = field(default_factory=list)  # profiles with a deployed model (1.1)
    session: str = ""  # new each time a coordinator starts the run (1.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase(self.phase))


@dataclass(frozen=True, kw_only=True)
class Spec(Message):
    """What every client needs once per run: the architecture and how to train it."""

    KIND: ClassVar[Kind] = Kind.SPEC
    model_json: str
    input_shape: list[int]
    optimizer: str
    learning_rate: float
    momentum: float
    local_epochs: int
    batch_size: int
    artifact: Manifest | None = None  # the trainable TFLite model for litert clients (1.1)
    artifact_error: str | None = None  # why there is none: litert clients cannot train (1.2)
    codec: str = ""  # how updates travel (1.7; codec.Codec); "" = each device by its profile


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Describes a chunked payload: where its chunks are and how to check them."""

    topic: str
    size: int
    chunks: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Round(Message):
    """A round announcement (retained on ``round``)."""

    KIND: ClassVar[Kind] = Kind.ROUND
    round: int
    model_version: int
    deadline: float
    model: Manifest
    local_epochs: int
    # Seconds the round lasts from its announcement (1.5): devices time it on their own clock,
    # never comparing ``deadline`` (the coordinator's clock) with theirs.
    duration: float = 0.0
    session: str = ""  # the coordinator's session that announced it (1.5)
    # The selection (1.6): the devices whose rank for ``draw`` is at most ``cutoff``
    # (:func:`rank`); the same few bytes for ten devices or a million.
    draw: str = ""
    cutoff: int = 0
    selected: list[str] = field(default_factory=list)  # the selection before 1.6, by id
    # The model as a change to the one of SHA-256 ``base`` (1.7, codec.encode_delta), at
    # ``model/<version>/delta/<i>``; a device that holds another fetches ``model`` whole.
    delta: Manifest | None = None
    base: str = ""
    # The SHA-256 of the Spec's ``model_json`` this round's model has (1.8, :func:`architecture`):
    # a rebuilt model comes with a new Spec, and a device trains once it holds that one.
    architecture: str = ""

    def selects(self, client_id: str) -> bool:
        """Whether this round selects ``client_id``."""
        if self.draw:
            return rank(self.draw, client_id) <= self.cutoff
        return client_id in self.selected


def architecture(model_json: str) -> str:
    """What :attr:`Round.architecture` names: the SHA-256 of a Spec's ``model_json``."""
    return hashlib.sha256(model_json.encode()).hexdigest()


EVERYONE = 2**64 - 1
"""The cutoff that selects every device."""


def rank(draw: str, client_id: str) -> int:
    """A device's place in a round's draw: 64 bits of SHA-256 over the draw and its id, so that
    the coordinator and every device compute the same selection from the round message alone."""
    digest = hashlib.sha256(f"{draw}/{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True, kw_only=True)
class Chunk(Message):
    """One piece of a chunked payload (a model or an update)."""

    KIND: ClassVar[Kind] = Kind.CHUNK
    index: int
    count: int
    size: int
    sha256: str
    data: bytes


@dataclass(frozen=True, kw_only=True)
class Metrics(Message):
    """Per-round summary for monitors (retained on ``metrics``)."""

    KIND: ClassVar[Kind] = Kind.METRICS
    values: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Deployment(Message):
    """The exported model for one device profile (retained on ``deploy/<profile>``)."""

    KIND: ClassVar[Kind] = Kind.DEPLOY
    profile: str
    model: Manifest
    precision: str
    accuracy: float
    export_json: str


@dataclass(frozen=True, kw_only=True)
class Notice(Message):
    """Coordinator -> one client: accepted or rejected (with the reason)."""

    KIND: ClassVar[Kind] = Kind.NOTICE
    round: int
    accepted: bool
    reason: str


@dataclass(frozen=True, kw_only=True)
class Telemetry(Message):
    """Everything a monitor shows (retained on ``telemetry``; see edge_client.telemetry)."""

    KIND: ClassVar[Kind] = Kind.TELEMETRY
    run: RunInfo
    progress: Progress | None
    rounds: list[dict[str, Any]]  # the last rounds' metrics.jsonl lines
    devices: list[DeviceRow]
    events: list[Event]  # the latest, oldest first


@dataclass(frozen=True, kw_only=True)
class Failed(Message):
    """A device -> the coordinator: its training for ``round`` failed, and why (1.5); sent on its
    update topic instead of an update, so that the round need not wait for it."""

    KIND: ClassVar[Kind] = Kind.FAILED
    round: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Tally(Message):
    """An aggregator -> the coordinator (1.6): what it did with a round's updates since its last
    tally: the devices whose update it accepted, those it is done with (accepted or rejected),
    its rejections by reason and the update bytes it received."""

    KIND: ClassVar[Kind] = Kind.TALLY
    round: int
    reported: list[str]
    responded: list[str]
    rejected: dict[str, int]
    bytes_up: int


@dataclass(frozen=True, kw_only=True)
class Close(Message):
    """The coordinator -> its aggregators (1.6): ``round`` is closed; send its partial sum."""

    KIND: ClassVar[Kind] = Kind.CLOSE
    round: int


_BY_KIND: dict[Kind, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Hello,
        Offline,
        Status,
        Spec,
        Round,
        Chunk,
        Metrics,
        Notice,
        Deployment,
        Telemetry,
        Failed,
        Tally,
        Close,
    )  # fmt: skip
}
_seq = itertools.count()


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """A decoded message with its routing fields."""

    version: str
    run: str
    sender: str
    seq: int
    message: Message = field(repr=False)
    signed: bool = False  # carried a signature that the receiver's Trust checked


def encode(message: Message, *, run: str, sender: str, signer: SigningKey | None = None) -> bytes:
    """Serialize one message in its envelope; with ``signer``, wrapped with its signature."""
    body = {f.name: _plain(getattr(message, f.name)) for f in dataclasses.fields(message)}
    envelope = {
        "v": PROTOCOL_VERSION,
        "kind": message.KIND.value,
        "run": run,
        "sender": sender,
        "seq": next(_seq),
        "body": body,
    }
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
        cls = _BY_KIND[Kind(raw["kind"])]
        message = _build(cls, raw["body"], newer=int(version.partition(".")[2]) > PROTOCOL_MINOR)
        return Envelope(
            version=version,
            run=str(raw["run"]),
            sender=str(raw["sender"]),
            seq=int(raw["seq"]),
            message=message,
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise WireError(f"malformed message ({exc})") from exc


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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_to_fit(payload: bytes, *, max_payload: int) -> Iterator[Chunk]:
    """``payload`` in chunks whose messages, envelope included, fit in ``max_payload`` bytes."""
    return split(payload, max_chunk=max_payload - ENVELOPE_ROOM)


def split(payload: bytes, *, max_chunk: int) -> Iterator[Chunk]:
    """Cut a payload into chunks whose data is at most ``max_chunk`` bytes."""
    if max_chunk < 1:
        raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
    digest = sha256(payload)
    count = max(1, -(-len(payload) // max_chunk))
    for index in range(count):
        data = payload[index * max_chunk : (index + 1) * max_chunk]
        yield Chunk(index=index, count=count, size=len(payload), sha256=digest, data=data)


class Reassembler:
    """Collects the chunks of one payload; duplicates (QoS 1 redelivery) are ignored."""

    def __init__(self, *, max_size: int) -> None:
        self.max_size = max_size
        self._parts: dict[int, bytes] = {}
        self._first: Chunk | None = None
        self._bytes = 0

    @property
    def held(self) -> int:
        """Bytes of chunk data held so far."""
        return self._bytes

    def add(self, chunk: Chunk) -> bytes | None:
        """Add a chunk; return the verified payload once complete, else ``None``."""
        first = self._first
        if first is None:
            if chunk.size > self.max_size:
                raise OversizeError(f"payload of {chunk.size} bytes exceeds {self.max_size}")
            if not 0 < chunk.count <= chunk.size + 1:
                raise WireError(f"bad chunk count {chunk.count} for {chunk.size} bytes")
            self._first = first = chunk
        elif (chunk.count, chunk.size, chunk.sha256) != (first.count, first.size, first.sha256):
            raise WireError("chunk does not belong to the payload being assembled")
        if not 0 <= chunk.index < first.count:
            raise WireError(f"chunk index {chunk.index} out of range 0..{first.count - 1}")
        if chunk.index not in self._parts:
            self._bytes += len(chunk.data)
            if self._bytes > first.size:  # never hold more than the declared payload
                raise WireError(f"chunks carry more than the declared {first.size} bytes")
        self._parts.setdefault(chunk.index, chunk.data)
        if len(self._parts) < first.count:
            return None
        payload = b"".join(self._parts[i] for i in range(first.count))
        if len(payload) != first.size or sha256(payload) != first.sha256:
            raise WireError("reassembled payload fails its size or SHA-256 check")
        return payload


class Collector:
    """Reassembles several chunked payloads, told apart by their SHA-256 (a client may see the
    chunks of a new model before the old one is complete). Keeps at most ``keep`` in progress."""

    def __init__(self, *, max_size: int = MAX_ASSEMBLED_BYTES, keep: int = 2) -> None:
        self.max_size = max_size
        self.keep = keep
        self._parts: dict[tuple[str, int], Reassembler] = {}
        self._done: set[str] = set()

    def add(self, chunk: Chunk) -> bytes | None:
        """The payload when ``chunk`` completes it (once per payload), else ``None``. The same
        payload cut into another number of chunks (republished for a smaller message limit) is
        assembled apart."""
        if chunk.sha256 in self._done:
            return None
        key = (chunk.sha256, chunk.count)
        if key not in self._parts and len(self._parts) >= self.keep:
            self._parts.pop(next(iter(self._parts)))  # the oldest, abandoned payload
        parts = self._parts.setdefault(key, Reassembler(max_size=self.max_size))
        try:
            payload = parts.add(chunk)
        except WireError:
            del self._parts[key]
            raise
        if payload is not None:
            del self._parts[key]
            self._done.add(chunk.sha256)
        return payload
