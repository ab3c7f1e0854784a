"""The coordinator's round loop over an in-memory broker, against scripted clients.

The broker delivers synchronously into queues. A scripted client answers the round announcement the
moment it is published, so its update chunks wait in the coordinator's queue, in publish order,
before the coordinator starts collecting: no threads, and the round closes once its quorum is met.
A test helper, kept out of the installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import numpy as np
from global_model import MaskedModel
from memory_broker import MemoryBroker, MemoryTransport

from fedprune.coordinator.config import RunConfig, ScheduleConfig, ScheduleKind
from fedprune.coordinator.global_model import GlobalModel
from fedprune.coordinator.parts import Parts
from fedprune.coordinator.result import RoundResult
from fedprune.coordinator.rounds import Coordinator
from fedprune.coordinator.validation import Limits
from fedprune.protocol.chunks import Reassembler, sha256, split
from fedprune.protocol.codec import Model, Update, decode_model, encode_update
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import TRAINING_RULES, Hello, Manifest, Notice, Round, Status
from fedprune.protocol.topics import Topics

RUN = "unit"
TOPICS = Topics(RUN)
# Pruned to 50% at round 1 and frozen after: the round under test (2) does not move the masks, so
# the new global weights are exactly the aggregate.
SCHEDULE = ScheduleConfig(kind=ScheduleKind.POLYNOMIAL, target=0.5, begin_round=0, end_round=1)
ROUND = 2
MLP_PARAMS = 8970

Answer = Callable[[Round, Model], None]


class ScriptedBroker(MemoryBroker):
    """A memory broker that calls the scripted clients when a round announcement is published."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[Answer] = []

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        super().route(topic, payload, retain)
        if topic == TOPICS.round and payload:
            announcement = decode(payload).message
            assert isinstance(announcement, Round)
            model = self.model(announcement)
            for answer in self.answers:
                answer(announcement, model)

    def model(self, announcement: Round) -> Model:
        """The global model, read back from its retained chunks as a client would."""
        return self.payload(announcement.model)

    def payload(self, manifest: Manifest) -> Model:
        """A model payload (the model, SCAFFOLD's control variate) from its retained chunks."""
        parts = Reassembler(max_size=manifest.size)
        payload = None
        for index in range(manifest.chunks):
            chunk = decode(self.retained[f"{manifest.topic}/{index}"]).message
            payload = parts.add(chunk)  # type: ignore[arg-type]
        assert payload is not None and sha256(payload) == manifest.sha256
        return decode_model(payload)

    def update_bytes(self) -> int:
        return sum(len(p) for t, p in self.log if TOPICS.parse_update(t) is not None)


class FakeClient:
    """Joins with a retained hello, publishes update chunks (answering the coordinator session
    it read on the status topic, as a device does) and reads its inbox."""

    def __init__(
        self,
        broker: ScriptedBroker,
        client_id: str,
        codecs: tuple[str, ...] = ("f32",),
        training: tuple[str, ...] = TRAINING_RULES,
    ) -> None:
        self.id = client_id
        self.transport = MemoryTransport(broker)
        self.transport.subscribe(TOPICS.inbox(client_id))
        self._status = MemoryTransport(broker)
        self._status.subscribe(TOPICS.status)
        self._session = ""
        hello = Hello(
            client_id=client_id,
            profile="generic-x86-64",
            num_samples=100,
            backend="scripted",
            codecs=list(codecs),
            training=list(training),
        )
        self.transport.publish(
            TOPICS.client_status(client_id), encode(hello, run=RUN, sender=client_id), retain=True
        )

    @property
    def session(self) -> str:
        """The coordinator session of the last status it published."""
        while (item := self._status.get(0)) is not None:
            if item[1] and isinstance(status := decode(item[1]).message, Status):
                self._session = status.session
        return self._session

    def chunks(self, payload: bytes, *, max_chunk: int = 1 << 20) -> list[bytes]:
        """The payload as encoded chunk messages."""
        session = self.session
        return [
            encode(c, run=RUN, sender=self.id, session=session)
            for c in split(payload, max_chunk=max_chunk)
        ]

    def publish(self, round_: int, messages: list[bytes]) -> None:
        for message in messages:
            raw = msgpack.unpackb(message)
            if "signed" in raw:  # a signed message: the chunk is in the envelope it wraps
                raw = msgpack.unpackb(raw["signed"])
            index = raw["body"]["index"]
            self.transport.publish(f"{TOPICS.update(self.id, round_)}/{index}", message)

    def send(self, round_: int, payload: bytes, *, max_chunk: int = 1 << 20) -> None:
        self.publish(round_, self.chunks(payload, max_chunk=max_chunk))

    def notices(self) -> list[Notice]:
        out = []
        while (item := self.transport.get(0)) is not None:
            message = decode(item[1]).message
            assert isinstance(message, Notice)
            out.append(message)
        return out


def random_delta(model: Model, seed: int, scale: float = 0.01) -> list[np.ndarray]:
    """A random delta that is zero at every pruned position, as a well-behaved client sends."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal(w.shape) * scale * (1 if m is None else m)).astype(np.float32)
        for w, m in zip(model.weights, model.masks, strict=True)
    ]


def update_payload(
    model: Model,
    deltas: list[np.ndarray],
    *,
    round_: int = ROUND,
    num_samples: int = 100,
    masks: list[np.ndarray | None] | None = None,
) -> bytes:
    update = Update(round=round_, num_samples=num_samples, deltas=deltas)
    return encode_update(update, model.masks if masks is None else masks)


@dataclass
class Harness:
    broker: ScriptedBroker
    coordinator: Coordinator
    clients: dict[str, FakeClient]

    def on_round(self, answer: Answer) -> None:
        self.broker.answers.append(answer)

    def run_round(self) -> tuple[Model, RoundResult, Model]:
        """The model before the round, the round's result and the model after it."""
        before = self.coordinator.pruner.model()
        result = self.coordinator.run_round(ROUND)
        return before, result, self.coordinator.pruner.model()


def assert_weights(got: Model, want: list[np.ndarray]) -> None:
    for g, w, m in zip(got.weights, want, got.masks, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
        if m is not None:
            assert not np.any(g[m == 0])


def make_harness(
    model: Callable[[ScheduleConfig], GlobalModel] = lambda schedule: MaskedModel(),
) -> Callable[..., Harness]:
    """What makes a harness: clients ``ids`` (a, b) joined to a started coordinator of a run of
    ``model`` (by default :class:`MaskedModel`, half pruned) with the config's ``overrides``."""

    def make(
        ids: tuple[str, ...] = ("a", "b"), *, limits: Limits | None = None, **overrides: object
    ) -> Harness:
        values: dict[str, object] = dict(
            run=RUN,
            model="mlp",
            rounds=2,
            min_clients=len(ids),
            round_timeout=2.0,
            quorum=1.0,
            schedule=SCHEDULE,
        )
        values.update(overrides)
        broker = ScriptedBroker()
        clients = {i: FakeClient(broker, i) for i in ids}
        config = RunConfig(**values)  # type: ignore[arg-type]
        transport = MemoryTransport(broker, max_payload=config.max_payload)
        global_model = model(config.schedule)
        parts = Parts.build(transport, config, global_model, limits=limits)
        coordinator = Coordinator(parts, global_model, evaluate=lambda: None)
        coordinator.start()
        coordinator.wait_for_clients(coordinator.config.min_clients)
        return Harness(broker=broker, coordinator=coordinator, clients=clients)

    return make
