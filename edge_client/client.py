"""The edge client's round loop: announce, receive the global model, train, send a sparse update.

Everything arrives on one queue and is handled on one thread. The round announcement and the model
chunks are retained on the broker, so a client that reconnects (or starts late) receives the current
round again and rejoins it if the deadline has not passed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from edge_client.codec import Model, Update, decode_model, encode_update
from edge_client.data import LocalData
from edge_client.errors import WireError
from edge_client.topics import Topics
from edge_client.trainer import Trainer, make_trainer
from edge_client.transport import Transport
from edge_client.wire import (
    Chunk,
    Hello,
    Message,
    Notice,
    Offline,
    Phase,
    Reassembler,
    Round,
    Spec,
    Status,
    decode,
    encode,
    split,
)

log = logging.getLogger("fedprune.client")

ENVELOPE_ROOM = 512  # bytes kept free in every publish for the envelope around a chunk


@dataclass(kw_only=True)
class ClientReport:
    rounds: list[int] = field(default_factory=list)
    bytes_up: int = 0
    rejected: int = 0
    finished: bool = False


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who a client is; its hello is retained on its status topic and its will replaces it."""

    run: str
    client_id: str
    profile: str
    num_samples: int
    backend: str

    def encode(self, message: Message) -> bytes:
        return encode(message, run=self.run, sender=self.client_id)

    def hello(self) -> tuple[str, bytes]:
        message = Hello(
            client_id=self.client_id,
            profile=self.profile,
            num_samples=self.num_samples,
            backend=self.backend,
        )
        return Topics(self.run).client_status(self.client_id), self.encode(message)

    def will(self) -> tuple[str, bytes]:
        topic = Topics(self.run).client_status(self.client_id)
        return topic, self.encode(Offline(who=self.client_id))


class EdgeClient:
    def __init__(
        self,
        transport: Transport,
        *,
        identity: Identity,
        data: LocalData,
        local_epochs: int | None = None,
        seed: int = 0,
    ) -> None:
        self.transport = transport
        self.identity = identity
        self.topics = Topics(identity.run)
        self.client_id = identity.client_id
        self.data = data
        self.local_epochs = local_epochs
        self.seed = seed
        self.report = ClientReport()
        self._spec: Spec | None = None
        self._trainer: Trainer | None = None
        self._round: Round | None = None
        self._assembling: dict[int, Reassembler] = {}
        self._models: dict[int, bytes] = {}

    def start(self) -> None:
        t = self.topics
        for pattern in (t.spec, t.round, t.status, t.all_models, t.inbox(self.client_id)):
            self.transport.subscribe(pattern)
        topic, payload = self.identity.hello()
        self.transport.publish(topic, payload, retain=True)

    def run(self, *, timeout: float | None = None) -> ClientReport:
        """Serve rounds until the coordinator finishes (or ``timeout`` seconds pass)."""
        self.start()
        end = None if timeout is None else time.monotonic() + timeout
        while not self.report.finished and (end is None or time.monotonic() < end):
            item = self.transport.get(timeout=0.5)
            if item is not None:
                self.handle(*item)
            self._maybe_train()
        return self.report

    def handle(self, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared retained message
            return
        try:
            message = decode(payload).message
            if isinstance(message, Spec):
                self._spec = message
            elif isinstance(message, Round):
                self._round = message
            elif isinstance(message, Chunk):
                self._add_model_chunk(topic, message)
            elif isinstance(message, Status):
                self.report.finished = message.phase is Phase.FINISHED
            elif isinstance(message, Notice) and not message.accepted:
                self.report.rejected += 1
                log.warning("round %d: update rejected (%s)", message.round, message.reason)
        except WireError as exc:
            log.warning("ignored a message on %s: %s", topic, exc)

    def _add_model_chunk(self, topic: str, chunk: Chunk) -> None:
        version = int(topic.rsplit("/", 2)[-2])
        if version in self._models:
            return
        assembler = self._assembling.setdefault(version, Reassembler(max_size=512 * 1024 * 1024))
        payload = assembler.add(chunk)
        if payload is not None:
            self._models = {version: payload}  # keep only the newest model
            self._assembling.pop(version)

    def _maybe_train(self) -> None:
        round_, spec = self._round, self._spec
        if round_ is None or spec is None or round_.round in self.report.rounds:
            return
        if self.client_id not in round_.selected or time.time() > round_.deadline:
            return
        payload = self._models.get(round_.model_version)
        if payload is None or len(payload) != round_.model.size:
            return
        self.report.rounds.append(round_.round)
        self.train_round(round_, spec, decode_model(payload))

    def train_round(self, round_: Round, spec: Spec, model: Model) -> None:
        if self._trainer is None:
            self._trainer = make_trainer(self.identity.backend, spec)
        x, x_test = self.data.shaped(spec.input_shape)
        started = time.perf_counter()
        epochs = self.local_epochs or round_.local_epochs
        seed = self.seed * 100_003 + round_.round
        new = self._trainer.fit(model, x, self.data.y, epochs=epochs, seed=seed)
        evaluation = self._trainer.evaluate(new, x_test, self.data.y_test)
        deltas = [np.asarray(n, np.float32) - w for n, w in zip(new, model.weights, strict=True)]
        update = Update(
            round=round_.round,
            num_samples=self.data.num_samples,
            deltas=deltas,
            metrics={
                "loss": evaluation.loss,
                "accuracy": evaluation.accuracy,
                "n_eval": float(evaluation.n),
                "train_seconds": time.perf_counter() - started,
            },
        )
        sent = self.send(round_.round, encode_update(update, model.masks))
        log.info(
            "round %d: trained %d epoch(s) on %d samples, held-out accuracy %.3f, sent %d bytes",
            round_.round,
            epochs,
            self.data.num_samples,
            evaluation.accuracy,
            sent,
        )

    def send(self, round_: int, payload: bytes) -> int:
        """Publish an update payload in chunks; returns the bytes put on the wire."""
        prefix = self.topics.update(self.client_id, round_)
        sent = 0
        for chunk in split(payload, max_chunk=self.transport.max_payload - ENVELOPE_ROOM):
            body = self.identity.encode(chunk)
            self.transport.publish(f"{prefix}/{chunk.index}", body)
            sent += len(body)
        self.transport.flush(timeout=30)
        self.report.bytes_up += sent
        return sent
