"""The coordinator's round loop.

Per round: publish the global model (sparse, chunked, retained) and the round announcement
(retained); collect updates until the quorum or the deadline; validate each (a bad one is counted
by reason and never touches the model); FedAvg into a streaming sum; write the average into the
wrapped model; advance the TF-MOT schedule by one step; evaluate; checkpoint; write one metrics
line and publish it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fedprune import device_profiles
from fedprune.coordinator.aggregation import Aggregator, make_aggregator
from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.observer import Observer, Observers
from fedprune.coordinator.pruning import Pruner
from fedprune.coordinator.telemetry import Telemetry
from fedprune.coordinator.validation import Limits, Reason, Rejected, classify, validate
from fedprune.device_profiles import DEFAULT_PROFILE
from fedprune.edge_client.codec import (
    Codec,
    Model,
    Update,
    apply_delta,
    decode_update,
    encode_delta,
    encode_model,
)
from fedprune.edge_client.errors import ConfigError, FedpruneError, SignatureError, WireError
from fedprune.edge_client.signing import SigningKey, Trust
from fedprune.edge_client.topics import NAME, Topics, check_name
from fedprune.edge_client.trainer import Evaluation, backend_class
from fedprune.edge_client.transport import Transport
from fedprune.edge_client.wire import (
    COORDINATOR,
    EVERYONE,
    UNSIGNED,
    Chunk,
    Close,
    Collector,
    Deployment,
    Failed,
    Hello,
    Manifest,
    Message,
    Metrics,
    Notice,
    Offline,
    Phase,
    Reassembler,
    Round,
    Spec,
    Status,
    Tally,
    Unanswered,
    architecture,
    decode,
    encode,
    rank,
    sha256,
    split_to_fit,
)
from fedprune.edge_client.wire import (
    Telemetry as TelemetrySnapshot,
)

log = logging.getLogger("fedprune.coordinator")

SENDER = COORDINATOR

_FEW_DEVICES = 1000
"""A telemetry snapshot with more devices is not encoded whole before it is shrunk: it would not
fit in a message of the usual size anyway (bisection still finds it if it does)."""

PARTIAL_WAIT = 30.0
"""Seconds the coordinator waits for its aggregators' partial sums once a round is closed."""

GONE_GRACE = 2.0
"""Seconds a round still waits after a device went offline before it closes for want of anyone
left to wait for: a broker that goes down sends every device's last will, then drops us too."""

RECONNECT_GRACE = 15.0
"""Seconds after our own connection came back (a broker restart) in which the devices that went
with it are still waited for: they reconnect with backoff (up to 8 s apart)."""

MIN_PAYLOAD = 16 * 1024
"""The smallest message limit a device may ask for (a smaller one would cut models to crumbs)."""

REPORTED_REASONS = 10_000
"""The most devices a round's report names with their rejection (the counts are all there)."""

Evaluator = Callable[[], Evaluation | None]


@dataclass(kw_only=True)
class RoundResult:
    """One line of metrics.jsonl."""

    round: int
    accuracy: float | None
    loss: float | None
    client_accuracy: float | None
    client_loss: float | None
    sparsity: float
    bytes_up: int
    bytes_down: int
    dense_bytes_up: int
    dense_bytes_down: int
    selected: int
    reported: int
    rejected: dict[str, int]
    seconds: float
    late: int = 0  # selected, and had not answered when the round closed (gone ones too)
    stale: int = 0  # updates of the previous round counted here (RunConfig.staleness_weight)
    codecs: dict[str, int] = field(default_factory=dict)  # accepted updates by codec (1.7)
    parameters: int = 0  # the model's, after the round (fewer once unit pruning rebuilt it)
    overdue: int = 0  # devices that resent their update for want of a notice (Hello.unanswered)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(kw_only=True)
class Collection:
    """State of the round being collected."""

    round: int
    model: Model
    announcement: Round
    selected: set[str]  # by the draw, from the devices online then (and later joiners it selects)
    aggregator: Aggregator
    reported: set[str] = field(default_factory=set)
    responded: set[str] = field(default_factory=set)  # reported, or rejected: no need to wait
    rejected: Counter[str] = field(default_factory=Counter)
    codecs: Counter[str] = field(default_factory=Counter)  # accepted updates by codec
    bytes_up: int = 0
    # Payloads in assembly, by (client, round topic level, SHA-256): a forged or garbled payload on
    # a device's topic is assembled and judged apart from the device's own.
    assembling: dict[tuple[str, str, str], Reassembler] = field(default_factory=dict)
    held: int = 0  # bytes held by all of ``assembling``, bounded by Limits.max_pending_bytes
    handled: set[tuple[str, str, str]] = field(default_factory=set)  # accepted or rejected
    seen: set[bytes] = field(default_factory=set)  # digests of the update messages received
    verdicts: dict[tuple[str, str, str], Notice] = field(default_factory=dict)  # their notices
    # devices that said they resent an update for want of a notice (overdue until it is in)
    claimed: set[str] = field(default_factory=set)

    def overdue(self) -> set[str]:
        return self.claimed - self.responded

    unreadable: set[tuple[str, str]] = field(default_factory=set)
    # device -> its last rejection, for the round's report
    why: dict[str, str] = field(default_factory=dict)
    partials: dict[str, Update] = field(default_factory=dict)  # by aggregator, once closed
    taken_by: dict[str, str] = field(default_factory=dict)  # device -> the aggregator that took it
    # each aggregator's chunks apart: two with nothing to add send the same bytes
    partial_parts: dict[str, Collector] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)  # devices whose previous-round update counted


class Coordinator:
    def __init__(
        self,
        transport: Transport,
        config: RunConfig,
        pruner: Pruner,
        *,
        evaluate: Evaluator,
        on_round: Callable[[RoundResult], None] | None = None,
        limits: Limits | None = None,
        build_artifact: Callable[[], bytes] | None = None,
        signer: SigningKey | None = None,
        trust: Trust = UNSIGNED,
        observers: list[Observer] | None = None,
    ) -> None:
        """``build_artifact`` makes the trainable TFLite artifact that ``litert`` clients train
        with; it is called once, at :meth:`start`, so that a model they cannot train is known
        (and said, in the log and in the Spec) before any device waits for it. ``observers``
        hear what happens, next to :attr:`telemetry` (which monitors read on the broker)."""
        self.build_artifact = build_artifact
        self.signer = signer  # signs everything the coordinator publishes
        self.trust = trust  # the enrolled devices' verify keys: what is not theirs is dropped
        self.dropped = 0  # device messages refused for a missing or bad signature
        self.artifact_error: str | None = None  # why litert clients cannot train, if they cannot
        self.codec = None if config.codec == "auto" else Codec.parse(config.codec)  # None: any
        # What the devices that reported last round hold (the model they trained from, as
        # published: the base of the next delta) and who they are.
        self._held: tuple[Model, str] | None = None
        self._holders: set[str] = set()
        self.transport = transport
        self.config = config
        self.pruner = pruner
        self.evaluate = evaluate
        self.on_round = on_round or (lambda result: None)
        self.limits = limits or Limits()
        self.topics = Topics(config.run)
        self.clients: dict[str, Hello] = {}
        # The profile each device announced -> the catalogue profile exported for it; a name from
        # the network is only ever looked up in the catalogue, never opened as a path.
        self.profiles: dict[str, str] = {}
        self.results: list[RoundResult] = []
        # Bytes the broker delivers to devices, by what each subscribes to: every status and
        # round message to each online device, a round's model to each device it selects, a
        # notice to its device, a deployment to the devices of its profile, and to each device
        # that joins what is retained then (spec, artifact for the litert trainer, status, round).
        self.bytes_down = 0
        self._joining = {"spec": 0, "artifact": 0, "status": 0, "round": 0}  # retained sizes
        self._down_counted = 0  # bytes_down already in a round's result
        self._left_at = -math.inf  # when a device last went offline (monotonic)
        self._aggregators_root = self.topics.aggregators.removesuffix("/#")
        # Aggregators sign with this coordinator's key: what they send is checked against it.
        self._own = UNSIGNED if signer is None else Trust.of({SENDER: signer.verify_key})
        self._artifact = b""  # the training artifact, once built
        self._artifact_limit = 0  # the chunk size it is published in
        self._architecture = ""  # the published Spec's (wire.architecture)
        # float32 bytes of the model the run began with (aggregators run without a model)
        self._dense = 0 if pruner is None else 4 * pruner.parameters()
        self._collect: Collection | None = None
        self._previous: Collection | None = None  # the last round: late updates may still count
        self.report: dict[str, Any] = {}  # who was late, gone, failed or rejected: last round
        self._model_chunks: list[str] = []
        self.telemetry = Telemetry(config, publish=self._publish_telemetry,
                                   signed=signer is not None)  # fmt: skip
        self.observer = Observers(self.telemetry, *(observers or []))
        self._trimmed_telemetry = False

    # -- publishing ------------------------------------------------------------------------------

    def _encode(self, message: Message) -> bytes:
        return encode(message, run=self.config.run, sender=SENDER, signer=self.signer)

    def _publish(
        self, topic: str, message: Message, *, retain: bool = True, receivers: int = 0
    ) -> int:
        """Publish; ``receivers`` devices get it (counted in :attr:`bytes_down`)."""
        payload = self._encode(message)
        self.transport.publish(topic, payload, retain=retain)
        self.bytes_down += len(payload) * receivers
        return len(payload)

    def status(self, phase: Phase, round_: int, *, deploy: list[str] | None = None) -> None:
        status = Status(phase=phase, round=round_, rounds=self.config.rounds,
                        deploy=deploy or [], session=self.telemetry.session)  # fmt: skip
        size = self._publish(self.topics.status, status, receivers=len(self.clients))
        self._joining["status"] = size
        self.observer.phase(phase, round_)

    def _publish_telemetry(self, snapshot: TelemetrySnapshot) -> None:
        """Publish a snapshot retained, made smaller until it fits in one message: the first of
        :func:`_shrunk`'s ever smaller snapshots that fits. Each holds less than the one before
        it, so that one is found by bisection: encoding thousands of devices is what costs."""
        limit = self.transport.max_payload
        payload = self._encode(snapshot) if len(snapshot.devices) <= _FEW_DEVICES else b""
        if payload and len(payload) <= limit:
            self.transport.publish(self.topics.telemetry, payload, retain=True)
            return
        smaller = [snapshot]
        while (next_one := _shrunk(smaller[-1])) is not None:
            smaller.append(next_one)
        low, high, fitting = (1 if payload else 0), len(smaller), b""  # first fit in [low, high]
        while low < high:
            middle = (low + high) // 2
            encoded = self._encode(smaller[middle])
            if len(encoded) <= limit:
                high, fitting = middle, encoded
            else:
                low = middle + 1
        if high > 0 and len(smaller) > 1 and not self._trimmed_telemetry:
            self._trimmed_telemetry = True
            log.warning(
                "telemetry is trimmed to fit in one message (%d bytes): it lists fewer"
                " devices, events or rounds", limit,
            )  # fmt: skip
        if not fitting:
            log.warning("telemetry does not fit in %d bytes", limit)
            return
        self.transport.publish(self.topics.telemetry, fitting, retain=True)

    def spec(self, artifact: Manifest | None = None) -> Spec:
        model = self.pruner.stripped
        self._architecture = architecture(model_json := model.to_json())
        return Spec(
            artifact=artifact,
            artifact_error=self.artifact_error,
            model_json=model_json,
            input_shape=[int(d) for d in model.input_shape[1:]],
            optimizer=self.config.optimizer,
            learning_rate=self.config.learning_rate,
            momentum=self.config.momentum,
            local_epochs=self.config.local_epochs,
            batch_size=self.config.batch_size,
            codec=self.codec.name if self.codec else "",
        )

    def _can_train(self, hello: Hello) -> bool:
        """Clients whose trainer needs the artifact cannot train when it could not be built,
        nor devices that cannot use the run's codec."""
        if self._cannot_encode(hello):
            return False
        return self.artifact_error is None or not _needs_artifact(hello.backend)

    def _cannot_encode(self, hello: Hello) -> str | None:
        """Why a device cannot send updates in the run's codec (``None``: it can)."""
        if self.codec is None:
            return None
        missing = self.codec.features() - set(hello.codecs)
        if not missing:
            return None
        return (f"this run's codec {self.codec.name} needs {', '.join(sorted(missing))}, which"
                " this device lacks: it is not selected")  # fmt: skip

    def _publish_artifact(self) -> Manifest | None:
        """Build the trainable TFLite artifact and publish its chunks retained; its manifest, or
        ``None`` with :attr:`artifact_error` saying why litert clients cannot train."""
        self.artifact_error, self._artifact = None, b""
        if self.build_artifact is None:
            self.artifact_error = "this coordinator builds no training artifact"
            return None
        try:
            artifact = self.build_artifact()
        except FedpruneError as exc:
            self.artifact_error = str(exc)
            log.warning("litert devices cannot train this model: %s", exc)
            return None
        self._artifact = artifact
        # In chunks every catalogue profile takes, so that it need not be sent again when a Pi
        # Zero joins; a device whose own profile takes less gets it again in smaller chunks (and
        # a rebuilt model's artifact goes in the chunks the devices online take already).
        limit = min(self.config.max_payload, _smallest_catalogue(), self._artifact_limit or 2**31)
        return self._publish_artifact_chunks(limit)

    def _publish_artifact_chunks(self, limit: int) -> Manifest:
        """Publish the artifact (retained) in chunks of at most ``limit`` bytes, to every litert
        device online (they all subscribe to it)."""
        artifact = self._artifact
        chunks = list(split_to_fit(artifact, max_payload=limit))
        self._joining["artifact"], self._artifact_limit = 0, limit
        receivers = sum(
            1 for h in self.clients.values() if _needs_artifact(h.backend)
        )  # joiner too
        for chunk in chunks:
            self._joining["artifact"] += self._publish(f"{self.topics.artifact}/{chunk.index}",
                                                       chunk, receivers=receivers)  # fmt: skip
        log.info("training artifact published: %d bytes in %d chunks", len(artifact), len(chunks))
        return Manifest(
            topic=self.topics.artifact, size=len(artifact), chunks=len(chunks),
            sha256=sha256(artifact),
        )  # fmt: skip

    def _fit(self, devices: Iterable[Hello]) -> int:
        """The largest message every one of ``devices`` takes: the run's ``max_payload``, or the
        smallest limit they announced (never under :data:`MIN_PAYLOAD`)."""
        limits = [max(MIN_PAYLOAD, h.max_payload) for h in devices if h.max_payload]
        return min([self.config.max_payload, *limits])

    def _joined(self, hello: Hello) -> None:
        """A device joined (or came back, already in :attr:`clients`): it got what is retained
        when it subscribed; and the artifact again, in chunks it takes, if it needs smaller ones
        (every litert device gets those, and the spec that names them)."""
        needs = _needs_artifact(hello.backend) and bool(self._artifact)
        joining = self._joining
        artifact = joining["artifact"] if needs else 0
        self.bytes_down += joining["spec"] + joining["status"] + joining["round"] + artifact
        if needs and (limit := self._fit([hello])) < self._artifact_limit:
            manifest = self._publish_artifact_chunks(limit)
            self._joining["spec"] = self._publish(self.topics.spec, self.spec(manifest),
                                                  receivers=len(self.clients))  # fmt: skip

    def _publish_model(
        self, version: int, model: Model, receivers: list[str]
    ) -> tuple[dict[str, Any], int]:
        """Publish the round's model (retained, in chunks that each of the ``receivers`` takes)
        and clear the previous version's: whole, and with ``downlink = "delta"`` as a change to
        the last published model for the receivers that hold it (a delta rebuilds a model a
        little off ``model`` when it rounds: that one is published whole too, and the next delta
        carries the difference). Returns the round message's manifest fields and the bytes
        delivered."""
        for topic in self._model_chunks:
            self.transport.publish(topic, b"", retain=True)
        self._model_chunks = []
        limit = self._fit(self.clients[c] for c in receivers if c in self.clients)
        held = None if self.config.downlink == "full" else self._held
        holders = [] if held is None else [c for c in receivers if c in self._holders]
        fields: dict[str, Any] = {}
        delta = None
        if held is not None and holders:
            base, base_sha = held
            values = "int8" if self.codec is None else self.codec.values
            codec = values if values in ("f32", "f16") else "int8"
            if self.config.downlink == "codec" and self.codec is not None:
                codec = self.codec.name  # top-k and zstd too: every receiver has them
            delta = encode_delta(base, model, codec)
            model = apply_delta(base, delta)
            fields = {"base": base_sha}
        payload = encode_model(model)
        if delta is not None and len(delta) >= len(payload):
            delta, fields, holders = None, {}, []  # no smaller: everyone fetches it whole
        fields["model"], sent = self._publish_chunks(
            self.topics.model(version), payload, limit, receivers=len(receivers) - len(holders)
        )
        if delta is not None:
            fields["delta"], more = self._publish_chunks(
                self.topics.delta(version), delta, limit, receivers=len(holders)
            )
            sent += more
        self._held = (model, fields["model"].sha256)
        return fields, sent

    def _publish_chunks(
        self, prefix: str, payload: bytes, limit: int, *, receivers: int
    ) -> tuple[Manifest, int]:
        """One retained chunked payload under ``prefix``: its manifest and bytes delivered."""
        sent = 0
        chunks = 0
        for chunk in split_to_fit(payload, max_payload=limit):
            topic = f"{prefix}/{chunk.index}"
            sent += self._publish(topic, chunk, receivers=receivers)
            self._model_chunks.append(topic)
            chunks += 1
        manifest = Manifest(topic=prefix, size=len(payload), chunks=chunks, sha256=sha256(payload))
        return manifest, sent

    # -- receiving -------------------------------------------------------------------------------

    def pump(self, timeout: float) -> bool:
        """Handle one message if one arrives within ``timeout`` seconds; ``False`` if none did."""
        for event in self.transport.connection_events():
            self.observer.connection(event)
        self.observer.tick()
        item = self.transport.get(timeout)
        if item is None:
            return False
        self.handle(*item)
        return True

    def handle(self, topic: str, payload: bytes) -> None:
        """One message: an update chunk, a device's status, or an aggregator's tally or partial."""
        if self.config.aggregators and topic.startswith(self._aggregators_root):
            self._on_aggregator(topic, payload)
            return
        parsed = self.topics.parse_update(topic)
        if parsed is not None:
            self._on_update_chunk(*parsed, payload)
            return
        client_id = self.topics.client_of_status(topic)
        if client_id is None or not payload or not NAME.fullmatch(client_id):
            return
        try:
            envelope = decode(payload, self.trust)
            message = envelope.message
        except SignatureError as exc:
            self.dropped += 1
            log.warning("dropped a status message on %s's topic: %s", client_id, exc)
            return
        except WireError as exc:
            log.warning("ignored status of %s: %s", client_id, exc)
            return
        if envelope.sender != client_id:
            log.warning("ignored a status message sent as %r on %s's status topic",
                        envelope.sender[:64], client_id)  # fmt: skip
        elif isinstance(message, Hello) and message.client_id != client_id:
            log.warning("ignored a hello for %r on %s's status topic", message.client_id[:64],
                        client_id)  # fmt: skip
        elif isinstance(message, Hello):
            joined = client_id not in self.clients
            unable = self._cannot_encode(message)
            if joined:
                log.info(
                    "client %s joined (%s, %d samples, %s trainer)%s",
                    client_id,
                    message.profile,
                    message.num_samples,
                    message.backend,
                    ""
                    if self._can_train(message)
                    else f": {unable or 'it cannot train this model'}",
                )
                exported = _catalogue_profile(client_id, message.profile)
                if exported is not None:
                    self.profiles[message.profile] = exported
            self.clients[client_id] = message
            if joined:
                self._joined(message)
            self._claimed(client_id, message.unanswered)
            if joined and unable:
                notice = Notice(round=0, accepted=False, reason=unable)
                self._publish(self.topics.inbox(client_id), notice, retain=False, receivers=1)
            self.observer.hello(message)
        elif isinstance(message, Offline) and self.clients.pop(client_id, None) is not None:
            self._left_at = time.monotonic()
            log.info("client %s went offline", client_id)
            self.observer.left(client_id)

    def _on_update_chunk(
        self, client_id: str, round_text: str, _index: str, payload: bytes
    ) -> None:
        state = self._collect
        if state is None:
            return
        digest = hashlib.sha256(payload).digest()
        if digest in state.seen:
            return  # a QoS 1 redelivery (after a reconnect): handled and counted once already
        state.seen.add(digest)
        state.bytes_up += len(payload)
        key = (client_id, round_text)
        chunk: Chunk | None = None
        target = state  # the round the payload is for, once known: its chunks are kept there
        try:
            envelope = decode(payload, self.trust)
            message = envelope.message
            if envelope.sender != client_id:
                raise Rejected(Reason.SENDER, f"sent as {envelope.sender!r} on {client_id}'s topic")
            self.observer.received(client_id, len(payload))  # the device's own bytes
            if isinstance(message, Failed):
                if round_text != str(state.round) or message.round != state.round:
                    raise Rejected(
                        Reason.ROUND, f"failure for round {round_text}, now {state.round}"
                    )
                raise Rejected(Reason.FAILED, f"its training failed: {message.reason[:200]}")
            if not isinstance(message, Chunk):
                raise WireError(f"expected a chunk, got {message.KIND}")
            chunk = message
            if self._answered(state, (*key, chunk.sha256), chunk):
                return  # a QoS 1 redelivery, or the rest of a payload already judged
            target = self._round_of(round_text, state)
            if self._answered(target, (*key, chunk.sha256), chunk):
                return
            joined = client_id not in target.selected  # after the draw, which may select it
            if joined and not (
                target.announcement.selects(client_id) and client_id in self.clients
            ):
                raise Rejected(Reason.UNSELECTED, f"{client_id} is not selected this round")
            if client_id in target.reported:
                raise Rejected(Reason.DUPLICATE, f"{client_id} already reported this round")
            complete = self._assemble(target, (*key, chunk.sha256), chunk)
            if complete is None:
                return
            update = validate(
                complete, target.model, round_=target.round, limits=self._limits(client_id)
            )
            if self.codec is not None and update.codec != self.codec.name:
                raise Rejected(Reason.CODEC, f"sent as {update.codec}; this run's codec is"
                               f" {self.codec.name}")  # fmt: skip
            k = self.config.clients_per_round
            if joined and 0 < k <= len(target.selected):
                raise Rejected(Reason.UNSELECTED, f"{client_id} joined after the draw, and round"
                               f" {target.round} has its {k} devices")  # fmt: skip
        except SignatureError as exc:
            # Not the device's: counted and logged, and kept away from the device's round state.
            state.rejected[Reason.SIGNATURE.value] += 1
            self.dropped += 1
            self.observer.rejected(client_id, Reason.SIGNATURE.value, str(exc))
            log.warning("round %d: dropped an update chunk on %s's topic: %s", state.round,
                        client_id, exc)  # fmt: skip
            return
        except (WireError, Rejected) as exc:
            # One rejection per payload, not per chunk: the rest of a rejected payload's chunks
            # are ignored like redeliveries; unreadable chunks count once per client and round.
            slot = None if chunk is None else (*key, chunk.sha256)
            if slot is not None:
                self._drop(target, slot)
            elif key in state.unreadable:
                return
            else:
                state.unreadable.add(key)
            rejected = exc if isinstance(exc, Rejected) else Rejected(classify(exc), str(exc))
            self._reject(state, client_id, rejected, round_text, verdict=(target, slot))
            return
        except Exception as exc:  # noqa: BLE001 - the network boundary: a bad update is data
            slot = None if chunk is None else (*key, chunk.sha256)
            if slot is not None:
                self._drop(target, slot)
            log.exception("round %d: unreadable update chunk from %s", state.round, client_id)
            rejected = Rejected(Reason.DECODE, f"unreadable update ({exc!r})")
            self._reject(state, client_id, rejected, round_text, verdict=(target, slot))
            return
        if target is state:
            state.aggregator.add(update)
        else:  # late, for the previous round: its deltas where the current model still has
            masks = state.model.masks
            kept = [d if m is None else d * m for d, m in zip(update.deltas, masks, strict=True)]
            weight = self.config.staleness_weight
            state.aggregator.add(dataclasses.replace(update, deltas=kept), weight=weight)
            state.stale.append(client_id)
            log.info("round %d: counted %s's late update for round %d (weight %g)", state.round,
                     client_id, target.round, weight)  # fmt: skip
        target.selected.add(client_id)  # a late joiner counts from its accepted update on
        state.codecs[update.codec] += 1
        target.reported.add(client_id)
        target.responded.add(client_id)
        self.observer.accepted(client_id, update)
        notice = Notice(round=target.round, accepted=True, reason="")
        target.verdicts[(*key, chunk.sha256)] = notice
        self._publish(self.topics.inbox(client_id), notice, retain=False, receivers=1)

    def _answered(self, state: Collection, slot: tuple[str, str, str], chunk: Chunk) -> bool:
        """Whether the payload of ``slot`` was judged already. A device that resends it had no
        notice: the first chunk of each copy gets the verdict again."""
        if slot not in state.handled:
            return False
        notice = state.verdicts.get(slot)
        if notice is not None and chunk.index == 0:
            log.info("round %d: %s sent an update it had sent before; answered again",
                     state.round, slot[0])  # fmt: skip
            self._publish(self.topics.inbox(slot[0]), notice, retain=False, receivers=1)
        return True

    def _claimed(self, client_id: str, claim: Unanswered | None) -> None:
        """A device says (in its hello) that it resends an update for want of a notice: one the
        round has not received is overdue, which monitors show and the log says."""
        state = self._collect
        if claim is None or state is None or claim.session != self.telemetry.session:
            return
        if claim.round != state.round or client_id in state.responded:
            return
        if client_id not in state.selected and not state.announcement.selects(client_id):
            return
        state.claimed.add(client_id)
        overdue = len(state.overdue())
        loud = len(state.claimed) % 100 == 1  # the first of a round, then one in a hundred
        log.log(
            logging.WARNING if loud else logging.INFO,
            "round %d: %s says it sent an update that has not arrived and resends it (resend %d);"
            " %d update(s) overdue (lost on the way, or held up: see docs/scaling.md)",
            state.round, client_id, claim.resends, overdue,
        )  # fmt: skip
        self.observer.overdue(client_id, claim.resends)

    def _round_of(self, round_text: str, state: Collection) -> Collection:
        """The round an update is for: the current one or, when late updates count
        (``staleness_weight``), the previous one."""
        if round_text == str(state.round):
            return state
        previous = self._previous
        if self.config.staleness_weight and previous and round_text == str(previous.round):
            return previous
        raise Rejected(Reason.ROUND, f"update for round {round_text}, now {state.round}")

    def _assemble(
        self, state: Collection, slot: tuple[str, str, str], chunk: Chunk
    ) -> bytes | None:
        """Add a chunk to its payload; the payload once complete. Memory is bounded per payload
        (``max_update_bytes``), per device (``max_payloads_per_device`` in assembly) and in all
        (``max_pending_bytes``), so made-up payloads cannot exhaust the coordinator."""
        limits = self.limits
        assembler = state.assembling.get(slot)
        if assembler is None:
            mine = sum(1 for other in state.assembling if other[:2] == slot[:2])
            if mine >= limits.max_payloads_per_device:
                raise Rejected(Reason.OVERSIZE, f"{slot[0]} has {mine} updates in assembly already")
            assembler = state.assembling[slot] = Reassembler(max_size=limits.max_update_bytes)
        before = assembler.held
        complete = assembler.add(chunk)
        state.held += assembler.held - before
        if state.held > limits.max_pending_bytes:
            raise Rejected(
                Reason.OVERSIZE,
                f"updates in assembly hold {state.held:,} bytes > {limits.max_pending_bytes:,}",
            )
        if complete is not None:
            self._drop(state, slot)
        return complete

    @staticmethod
    def _drop(state: Collection, slot: tuple[str, str, str]) -> None:
        """Forget a payload's chunks; later chunks of it are ignored."""
        assembler = state.assembling.pop(slot, None)
        if assembler is not None:
            state.held -= assembler.held
        state.handled.add(slot)

    def _limits(self, client_id: str) -> Limits:
        """The validation limits for one device: no more samples than its hello declared."""
        hello = self.clients.get(client_id)
        if hello is None or hello.num_samples >= self.limits.max_samples:
            return self.limits
        return dataclasses.replace(self.limits, max_samples=max(1, hello.num_samples))

    def _reject(
        self,
        state: Collection,
        client_id: str,
        rejected: Rejected,
        round_text: str,
        *,
        verdict: tuple[Collection, tuple[str, str, str] | None] | None = None,
    ) -> None:
        """Count a rejection in the current round; the notice names the round the payload was
        for (``round_text``, from its topic), so that a device does not take the rejection of
        an old payload for the answer to its current one. ``verdict`` is where to keep it (the
        payload's round and slot), to answer a copy of the payload again."""
        state.rejected[rejected.reason.value] += 1
        if len(state.why) < REPORTED_REASONS:
            state.why[client_id] = str(rejected)[:200]
        not_its_answer = (Reason.ROUND, Reason.UNSELECTED, Reason.SENDER)
        current = round_text == str(state.round)
        if current and client_id in state.selected and rejected.reason not in not_its_answer:
            state.responded.add(client_id)  # its answer for this round is in: do not wait for it
        log.warning("round %d: rejected an update from %s: %s", state.round, client_id, rejected)
        self.observer.rejected(client_id, rejected.reason.value, rejected.detail)
        if round_text.isdigit() and len(round_text) < 10:
            notice = Notice(round=int(round_text), accepted=False, reason=str(rejected))
            if verdict is not None and verdict[1] is not None:
                verdict[0].verdicts[verdict[1]] = notice
            self._publish(self.topics.inbox(client_id), notice, retain=False, receivers=1)

    # -- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        self.transport.subscribe(self.topics.all_client_status)
        # With aggregators, they take the updates ($share) and send tallies and partial sums.
        updates = self.topics.aggregators if self.config.aggregators else self.topics.all_updates
        self.transport.subscribe(updates)
        spec = self.spec(self._publish_artifact())
        self._joining["spec"] = self._publish(self.topics.spec, spec, receivers=len(self.clients))
        self.status(Phase.WAITING, 0)

    def wait_for_clients(self) -> None:
        self._await_clients(self.config.min_clients)

    def _await_clients(self, count: int) -> None:
        """Wait up to ``join_timeout`` for ``count`` clients online, then read every hello that is
        already queued, so that clients joining together are all in the first selection."""
        deadline = time.monotonic() + self.config.join_timeout
        while len(self.clients) < count:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"only {len(self.clients)} of {count} clients online after waiting"
                    f" {self.config.join_timeout:.0f} s"
                )
            self.pump(0.2)
        while self.pump(0.0):
            pass

    def select(self, round_: int) -> tuple[list[str], str, int]:
        """The round's draw, its cutoff and the online clients that can train it selects: all of
        them, or the ``clients_per_round`` of lowest rank. The draw is seeded by the run's seed
        and the round, so a resumed run selects as the uninterrupted one would have."""
        draw = f"{random.Random(f'{self.config.seed}/{round_}').getrandbits(64):016x}"
        online = sorted(
            (rank(draw, c), c) for c, hello in self.clients.items() if self._can_train(hello)
        )
        k = self.config.clients_per_round
        if k <= 0 or k >= len(online):
            return sorted(c for _, c in online), draw, EVERYONE
        return sorted(c for _, c in online[:k]), draw, online[k - 1][0]

    def run_round(self, round_: int) -> RoundResult:
        started = time.perf_counter()
        self._await_clients(1)  # everyone may have dropped: wait for someone to come back
        model = self.pruner.model()
        selected, draw, cutoff = self.select(round_)
        if not selected:
            hello = next(iter(self.clients.values()))
            why = self._cannot_encode(hello) or (
                f"their trainer needs the TFLite training artifact: {self.artifact_error}"
            )  # fmt: skip
            raise ConfigError(
                f"none of the {len(self.clients)} online clients can train this model ({why})"
            )
        manifests, model_bytes = self._publish_model(round_, model, selected)
        announcement = Round(
            round=round_,
            model_version=round_,
            deadline=time.time() + self.config.round_timeout,
            duration=self.config.round_timeout,
            session=self.telemetry.session,
            draw=draw,
            cutoff=cutoff,
            local_epochs=self.config.local_epochs,
            architecture=self._architecture,
            **manifests,
        )
        round_bytes = self._publish(self.topics.round, announcement, receivers=len(self.clients))
        self._joining["round"] = round_bytes
        self.observer.round_started(round_, selected, announcement.deadline,
                                    model_bytes + round_bytes)  # fmt: skip
        self.status(Phase.TRAINING, round_)
        state = Collection(
            round=round_,
            model=model,
            announcement=announcement,
            selected=set(selected),
            aggregator=make_aggregator(
                self.config.aggregation,
                [w.shape for w in model.weights],
                clip_norm=self.config.clip_norm,
                trim=self.config.trim,
            ),
        )
        self._collect = state
        deadline = time.monotonic() + self.config.round_timeout
        while not self._closed(state) and time.monotonic() < deadline:
            self.pump(0.1)
        if self.config.aggregators:
            self._gather(state)
        self._collect = None
        self._holders = set(state.reported)  # they hold this round's model: a delta's base
        state.assembling.clear()  # what had not arrived whole by the close never will count
        self._previous = state if self.config.staleness_weight else None
        late = sorted(state.selected - state.responded)  # no answer when the round closed
        if state.aggregator.count:
            self.pruner.set_weights(state.aggregator.apply(model.weights))
        else:
            log.warning("round %d: no valid update arrived; the model is unchanged", round_)
        self.pruner.step(round_)
        if self.pruner.rebuild_due(round_) and self.pruner.rebuild():
            self._rebuilt(round_)
        evaluation = self.evaluate()
        dense = self._dense  # the model the run began with: what dense FedAvg would send
        client = state.aggregator.client_metrics()
        result = RoundResult(
            round=round_,
            accuracy=None if evaluation is None else evaluation.accuracy,
            loss=None if evaluation is None else evaluation.loss,
            client_accuracy=client.get("accuracy"),
            client_loss=client.get("loss"),
            sparsity=self.pruner.sparsity(),
            bytes_up=state.bytes_up,
            bytes_down=self.bytes_down - self._down_counted,  # since the previous round's end
            dense_bytes_up=dense * len(state.reported),
            dense_bytes_down=dense * len(selected),
            selected=len(state.selected),
            reported=len(state.reported),
            rejected=dict(state.rejected),
            seconds=time.perf_counter() - started,
            late=len(late),
            stale=len(state.stale),
            codecs=dict(state.codecs),
            parameters=self.pruner.parameters(),
            overdue=len(state.claimed),
        )
        self.report = {
            "round": round_, "late": [c for c in late if c in self.clients], "stale": state.stale,
            "gone": [c for c in late if c not in self.clients],  # their connection dropped
            "rejected": state.why,
        }  # fmt: skip
        self._down_counted = self.bytes_down
        self.results.append(result)
        self._publish(self.topics.metrics, Metrics(values=result.to_dict()))
        self.observer.round_ended(result, late)
        self.on_round(result)
        return result

    def _rebuilt(self, round_: int) -> None:
        """The model was rebuilt smaller (unit pruning): publish its Spec and training artifact
        again; the next round's model goes whole (no device holds one of this shape)."""
        log.info("round %d: the model is rebuilt without its removed units: %d parameters",
                 round_, self.pruner.parameters())  # fmt: skip
        self._held, self._holders = None, set()
        self._previous = None  # late updates of the old shapes cannot count any more
        spec = self.spec(self._publish_artifact())
        self._joining["spec"] = self._publish(self.topics.spec, spec, receivers=len(self.clients))

    # -- aggregators (docs/scaling.md) -----------------------------------------------------------

    def _on_aggregator(self, topic: str, payload: bytes) -> None:
        """A tally or a partial sum chunk from an aggregator; signed with this coordinator's key
        when the run is signed (they run with it)."""
        state = self._collect
        if state is None or not payload:
            return
        try:
            envelope = decode(payload, self._own)
            message = envelope.message
            if envelope.sender != SENDER:
                raise WireError(f"sent as {envelope.sender[:64]!r}")
            partial = f"/partial/{state.round}/" in topic
            if isinstance(message, Tally) and message.round == state.round:
                name = topic[len(self._aggregators_root) + 1 :].split("/")[0]
                for client_id in message.reported:
                    taken = state.taken_by.setdefault(client_id, name)
                    if taken != name:
                        log.error("round %d: %s's update was summed by two aggregators (%s and"
                                  " %s): it weighs twice in this round", state.round, client_id,
                                  taken, name)  # fmt: skip
                state.reported.update(c for c in message.reported if c in state.selected)
                state.responded.update(c for c in message.responded if c in state.selected)
                for reason, count in message.rejected.items():
                    state.rejected[str(reason)[:32]] += max(0, int(count))
                state.bytes_up += max(0, message.bytes_up)
            elif isinstance(message, Chunk) and partial:
                name = topic[len(self._aggregators_root) + 1 :].split("/")[0]
                if name not in state.partial_parts and len(state.partial_parts) >= 4 * (
                    self.config.aggregators
                ):
                    raise WireError(f"more aggregators than the {self.config.aggregators} expected")
                whole = state.partial_parts.setdefault(name, Collector()).add(message)
                if whole is not None:
                    state.partials[name] = decode_update(whole, state.model)
        except (WireError, TypeError, ValueError) as exc:
            log.warning("ignored a message on %s: %s", topic, exc)

    def _gather(self, state: Collection) -> None:
        """Close the round for the aggregators and add up their partial sums (FedAvg: each is
        its average delta and its weight, the samples behind it)."""
        self._publish(self.topics.close, Close(round=state.round), retain=False)
        end = time.monotonic() + PARTIAL_WAIT
        while len(state.partials) < self.config.aggregators and time.monotonic() < end:
            self.pump(0.1)
        if len(state.partials) < self.config.aggregators:
            log.warning("round %d: %d of %d aggregators sent their partial sum in %.0f s",
                        state.round, len(state.partials), self.config.aggregators,
                        PARTIAL_WAIT)  # fmt: skip
        for partial in state.partials.values():
            weight = partial.metrics.get("weight", 0.0)
            if weight > 0:
                state.aggregator.add(dataclasses.replace(partial, num_samples=1), weight=weight)

    def _closed(self, state: Collection) -> bool:
        """Whether the round can close: its quorum of the selected devices (late joiners among
        them once accepted) reported, or no selected device that is still online has yet to
        answer (one whose connection dropped, its last will, is not waited for)."""
        needed = max(1, math.ceil(self.config.quorum * len(state.selected)))
        if len(state.reported) >= needed:
            return True
        if time.monotonic() - self._left_at < GONE_GRACE or (
            self.transport.steady_for() < RECONNECT_GRACE
        ):
            return False  # a broker restart drops everyone at once: they will be back soon
        return not any(c not in state.responded and c in self.clients for c in state.selected)

    def run(self) -> list[RoundResult]:
        self.train()
        self.finish()
        return self.results

    def resume(self, results: list[RoundResult]) -> None:
        """Continue after the rounds of ``results`` (a checkpoint's): :meth:`train` runs the
        rest. The model, the schedule and the ledger come with the checkpoint; ``bytes_down``
        goes on from what those rounds sent (not what the killed round had sent)."""
        self.results = list(results)
        restored = sum(r.bytes_down for r in results)
        self.bytes_down += restored
        self._down_counted += restored
        self.telemetry.resume(self.results)
        if results:
            log.info("resuming after round %d of %d", results[-1].round, self.config.rounds)

    def train(self) -> list[RoundResult]:
        """Announce the run, wait for the clients and run every round not run yet."""
        self.start()
        first = len(self.results) + 1
        if first <= self.config.rounds:
            self.wait_for_clients()
        for round_ in range(first, self.config.rounds + 1):
            self.run_round(round_)
        return self.results

    def deploy(self, profile: str, model: bytes, *, precision: str, accuracy: float,
               export_json: str) -> str:  # fmt: skip
        """Publish an exported model for one device profile: retained chunks, then the manifest.
        Returns the model's SHA-256, which a device's hello names once it installed it."""
        prefix = f"{self.topics.deploy(profile)}/chunks"
        devices = [h for h in self.clients.values() if h.deploys and h.profile == profile]
        receivers = len(devices)
        chunks = list(split_to_fit(model, max_payload=self._fit(devices)))
        for chunk in chunks:
            self._publish(f"{prefix}/{chunk.index}", chunk, receivers=receivers)
        manifest = Manifest(topic=prefix, size=len(model), chunks=len(chunks), sha256=sha256(model))
        deployment = Deployment(profile=profile, model=manifest, precision=precision,
                                accuracy=accuracy, export_json=export_json)  # fmt: skip
        self._publish(self.topics.deploy(profile), deployment, receivers=receivers)
        self.observer.deployed(profile, manifest.sha256, accuracy)
        return manifest.sha256

    def await_installs(self, deployed: dict[str, str], timeout: float) -> list[str]:
        """Give the online devices of each deployed profile (``deployed``: profile -> SHA-256)
        that install deployments up to ``timeout`` seconds to say they run the new model; those
        that have not, by id."""

        def missing() -> list[str]:
            return sorted(
                client_id
                for client_id, hello in self.clients.items()
                if hello.deploys
                and hello.profile in deployed
                and hello.installed != deployed[hello.profile]
            )

        end = time.monotonic() + timeout
        while missing() and time.monotonic() < end:
            self.pump(0.1)
        return missing()

    def abort(self) -> None:
        """Tell the clients the run stopped on an error (best effort: the broker may be gone)."""
        for topic in [*self._model_chunks, self.topics.round]:
            self.transport.publish(topic, b"", retain=True)
        status = Status(phase=Phase.ABORTED, round=0, rounds=self.config.rounds,
                        session=self.telemetry.session)  # fmt: skip
        self._publish(self.topics.status, status, receivers=len(self.clients))
        self.observer.phase(
            Phase.ABORTED, self.telemetry.last.run.round if self.telemetry.last else 0
        )
        self.transport.flush(timeout=5)

    def finish(self, *, deployed: list[str] | None = None) -> None:
        """Clear the round state and say the run is over (and which profiles got a model)."""
        for topic in [*self._model_chunks, self.topics.round]:
            self.transport.publish(topic, b"", retain=True)
        self._model_chunks = []
        self.status(Phase.FINISHED, self.config.rounds, deploy=deployed)
        if not self.transport.flush(timeout=30):
            log.warning("the broker did not acknowledge the final status in time")


def _shrunk(snapshot: TelemetrySnapshot) -> TelemetrySnapshot | None:
    """A smaller snapshot: first only the latest events and rounds, then half the devices (those
    in the round and online first; the run's ``devices_total`` still counts them all), then
    shorter lists of the round's devices, then fewer events and rounds; ``None`` when nothing is
    left to drop."""
    events, rounds, devices, progress = (
        snapshot.events, snapshot.rounds, snapshot.devices, snapshot.progress
    )  # fmt: skip
    if len(events) > 10 or len(rounds) > 20:
        return dataclasses.replace(snapshot, events=events[-10:], rounds=rounds[-20:])
    if devices:
        busy = set(progress.selected) if progress is not None else set()
        first = sorted(devices, key=lambda d: (d.id not in busy, not d.online, d.id))
        kept = sorted(first[: len(devices) // 2], key=lambda d: d.id)
        return dataclasses.replace(snapshot, devices=kept)
    if progress is not None and (progress.selected or progress.reported):
        half = dataclasses.replace(
            progress, selected=progress.selected[: len(progress.selected) // 2],
            reported=progress.reported[: len(progress.reported) // 2],
        )  # fmt: skip
        return dataclasses.replace(snapshot, progress=half)
    if events or rounds:
        return dataclasses.replace(
            snapshot, events=events[len(events) // 2 + 1 :], rounds=rounds[len(rounds) // 2 + 1 :]
        )
    return None


def _catalogue_profile(client_id: str, announced: str) -> str | None:
    """The shipped profile whose export a device that announced ``announced`` gets: that one if
    it is in the catalogue, else the default one; ``None`` for a name that cannot name a topic."""
    try:
        check_name(announced, "profile")
    except ConfigError:
        log.warning("client %s announced an unusable profile name %r: no deployment for it",
                    client_id, announced[:64])  # fmt: skip
        return None
    if announced in device_profiles.available():
        return announced
    log.warning("client %s announced profile %r, which is not in the catalogue: it gets the %s"
                " export", client_id, announced, DEFAULT_PROFILE)  # fmt: skip
    return DEFAULT_PROFILE


@functools.cache
def _smallest_catalogue() -> int:
    """The smallest message limit of the shipped profiles."""
    return min(device_profiles.load(name).max_payload_bytes for name in device_profiles.available())


def _needs_artifact(backend: str) -> bool:
    try:
        return backend_class(backend).needs_artifact
    except ConfigError:  # a backend this side does not know: nothing to build for it
        return False
