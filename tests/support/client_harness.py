"""The edge client's tests' harness: a round as the coordinator leaves it retained on an in-memory
broker, a numpy trainer that adds one to every kept weight, and the client under test.

A test helper, kept out of the installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from memory_broker import MemoryBroker, MemoryTransport

from fedprune.edge_client.client import EdgeClient
from fedprune.edge_client.data import LocalData
from fedprune.edge_client.task import Evaluation
from fedprune.edge_client.trainer import EpochHook, Trainer
from fedprune.edge_client.uplink import Identity
from fedprune.protocol.chunks import sha256, split
from fedprune.protocol.codec import Model, encode_model
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import Chunk, Manifest, Message, Phase, Round, Spec, Status
from fedprune.protocol.topics import Topics

RUN = "kitchen-run"
CLIENT = "pi-kitchen"
ROUND = 3
VERSION = 7
TOPICS = Topics(RUN)
SPEC = Spec(
    model_json="{}",
    input_shape=[4],
    optimizer="sgd",
    learning_rate=0.1,
    momentum=0.0,
    local_epochs=1,
    batch_size=8,
)
"""The run's Spec as the client tests' coordinator publishes it (the trainer ignores the model)."""


class AddOneTrainer(Trainer):
    """Adds 1.0 to every weight and keeps masked ones at zero; "evaluates" to fixed numbers;
    keeps the learning rate and the SCAFFOLD correction each ``fit`` was given in ``rates`` and
    ``corrections``. Its mean gradient is :data:`GRADIENT` times the number of fits so far, at
    every position (pruned ones too, as a real gradient)."""

    GRADIENT = 0.5

    def __init__(self, spec: Spec, *, artifact: bytes | None = None) -> None:
        super().__init__(spec, artifact=artifact)
        self.rates: list[float | None] = []
        self.corrections: list[list[np.ndarray] | None] = []
        self._shapes: list[tuple[int, ...]] = []

    def fit(
        self,
        model: Model,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        seed: int,
        on_epoch: EpochHook | None = None,
        learning_rate: float | None = None,
        correction: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        self._check_scaffold(correction)
        self.rates.append(learning_rate)
        self.corrections.append(correction)
        self._shapes = [w.shape for w in model.weights]
        for epoch in range(1, epochs + 1):
            if on_epoch is not None:
                on_epoch(epoch)
        return [
            (w + np.float32(1.0)) * (np.float32(1.0) if m is None else m)
            for w, m in zip(model.weights, model.masks, strict=True)
        ]

    def mean_gradient(self) -> list[np.ndarray]:
        value = np.float32(self.GRADIENT * len(self.rates))
        return [np.full(shape, value, np.float32) for shape in self._shapes]

    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> Evaluation:
        return Evaluation(loss=0.25, accuracy=0.5, n=len(y))


class FinishingBroker(MemoryBroker):
    """Announces the end of the run once a client's last update chunk arrives, as a coordinator
    would; this lets ``EdgeClient.run`` return without waiting for a timeout."""

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        super().route(topic, payload, retain)
        if TOPICS.parse_update(topic) is None:
            return
        chunk = chunk_of(payload)
        if chunk.index == chunk.count - 1:
            status = Status(phase=Phase.FINISHED, round=ROUND, rounds=ROUND)
            super().route(TOPICS.status, encode_message(status), True)


def encode_message(message: Message) -> bytes:
    return encode(message, run=RUN, sender="coordinator")


def publish_run(
    broker: MemoryBroker,
    model: Model,
    *,
    selected: list[str],
    deadline: float,
    duration: float = 0.0,
    session: str = "",
    local_epochs: int = 1,
    codec: str = "",
    control: Model | None = None,
) -> None:
    """What the coordinator leaves retained for a round: spec, model chunks, announcement; with
    ``control``, a SCAFFOLD run's, whose round has that control variate (its chunks retained
    under ``TOPICS.control(VERSION)``)."""
    coordinator = MemoryTransport(broker)
    spec = dataclasses.replace(SPEC, codec=codec, scaffold=control is not None)
    coordinator.publish(TOPICS.spec, encode_message(spec), retain=True)
    manifest = publish_chunks(coordinator, TOPICS.model(VERSION), encode_model(model))
    announcement = Round(
        round=ROUND,
        model_version=VERSION,
        deadline=deadline,
        selected=selected,
        model=manifest,
        local_epochs=local_epochs,
        duration=duration,
        session=session,
        control=None
        if control is None
        else publish_chunks(coordinator, TOPICS.control(VERSION), encode_model(control)),
    )
    coordinator.publish(TOPICS.round, encode_message(announcement), retain=True)
    coordinator.close()


def publish_chunks(coordinator: MemoryTransport, prefix: str, payload: bytes) -> Manifest:
    """``payload`` retained in 700-byte chunks at ``<prefix>/<i>``, as the coordinator does."""
    chunks = list(split(payload, max_chunk=700))
    for chunk in chunks:
        coordinator.publish(f"{prefix}/{chunk.index}", encode_message(chunk), retain=True)
    return Manifest(topic=prefix, size=len(payload), chunks=len(chunks), sha256=sha256(payload))


def make_client(
    broker: MemoryBroker,
    data: LocalData,
    *,
    backend: str = "fake",
    max_payload: int = 1024,
    **options: Any,
) -> EdgeClient:
    """Device ``CLIENT`` (a Pi 4) of run ``RUN`` with ``data``, training with ``backend``, with
    EdgeClient's other ``options`` (its trust, its deployment receiver, ...)."""
    identity = Identity(
        run=RUN,
        client_id=CLIENT,
        profile="raspberry-pi-4",
        num_samples=data.num_samples,
        backend=backend,
    )
    transport = MemoryTransport(broker, max_payload=max_payload)
    return EdgeClient(transport, identity=identity, data=data, **options)


def publish_spec(broker: MemoryBroker, **changes: object) -> None:
    """Leave :data:`SPEC` with ``changes`` retained, as the coordinator does."""
    spec = dataclasses.replace(SPEC, **changes)  # type: ignore[arg-type]
    MemoryTransport(broker).publish(TOPICS.spec, encode_message(spec), retain=True)


def chunk_of(payload: bytes) -> Chunk:
    chunk = decode(payload).message
    assert isinstance(chunk, Chunk)
    return chunk


def update_chunks(broker: MemoryBroker) -> list[tuple[str, bytes]]:
    return [(t, p) for t, p in broker.log if TOPICS.parse_update(t) is not None]
