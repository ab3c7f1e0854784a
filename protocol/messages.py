"""What is said on the wire: every message kind as a frozen dataclass, and the records they hold.

A message's fields are its body; :mod:`fedprune.protocol.envelope` wraps it (version, run, sender,
sequence, signature) and :mod:`fedprune.protocol.chunks` cuts large payloads (models, updates)
into ``Chunk`` messages. docs/protocol.md says what each one means and since which version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from fedprune.protocol.telemetry import DeviceRow, Event, Progress, RunInfo

COORDINATOR = "coordinator"
"""The sender id of every message the coordinator publishes."""

PROX = "prox"
"""A device's training rule (``Hello.training``): it adds ``Spec.prox_mu``'s proximal term."""
SCHEDULE = "schedule"
"""A device's training rule: it trains each round at ``Round.learning_rate``."""
SCAFFOLD = "scaffold"
"""A device's training rule: it corrects its steps by ``Round.control`` and its own control
variate, and sends that variate's change with its update (``Spec.scaffold``)."""
TRAINING_RULES = (PROX, SCHEDULE, SCAFFOLD)
"""The local training rules a device of this version follows."""

KINDS: dict[Kind, type[Message]] = {}
"""Every message class by its kind (filled as each is defined)."""


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
    """Base of all messages: subclasses set ``KIND`` and add their fields; defining one adds it
    to :data:`KINDS`, the table a receiver decodes by."""

    KIND: ClassVar[Kind]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KINDS[cls.KIND] = cls


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
    # The local training rules it follows (1.13; TRAINING_RULES): a run that uses one a device
    # lacks does not select it.
    training: list[str] = field(default_factory=list)


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
    task: str = "classify"  # what the model learns (1.12; edge_client.task.Task)
    # FedProx (1.13): the device adds prox_mu / 2 * ||w - w_round||^2 to its loss (0: off).
    prox_mu: float = 0.0
    # SCAFFOLD (1.13): devices correct their gradients by c - c_i and send c_i's change.
    scaffold: bool = False


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
    # The L2 norm this round's updates are clipped to (1.11, 0: none): the coordinator's
    # aggregators clip to it; devices need not know it.
    norm_bound: float = 0.0
    # The devices' learning rate this round (1.13, the run's schedule over rounds): 0 = the Spec's.
    learning_rate: float = 0.0
    # SCAFFOLD's global control variate c (1.13, with Spec.scaffold): a model payload (the round
    # model's masks) at ``model/<version>/control/<i>``.
    control: Manifest | None = None

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
class RoundMetrics(Message):
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
    # The export's LiteRT score: its accuracy, or an autoencoder's AUC (1.12: None, an
    # autoencoder scored by its MSE alone; export_json has everything)
    accuracy: float | None
    export_json: str


@dataclass(frozen=True, kw_only=True)
class Notice(Message):
    """Coordinator -> one client: accepted or rejected (with the reason)."""

    KIND: ClassVar[Kind] = Kind.NOTICE
    round: int
    accepted: bool
    reason: str


@dataclass(frozen=True, kw_only=True)
class Snapshot(Message):
    """Everything a monitor shows (retained on ``telemetry``; see protocol.telemetry)."""

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
    norms: list[float] = field(default_factory=list)  # of the updates it accepted (1.11)


@dataclass(frozen=True, kw_only=True)
class Close(Message):
    """The coordinator -> its aggregators (1.6): ``round`` is closed; send its partial sum."""

    KIND: ClassVar[Kind] = Kind.CLOSE
    round: int
