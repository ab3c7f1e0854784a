"""Simulated devices for benchmarks/fleet.py: many devices of one worker process on one MQTT
connection, signed and answering as ``fedprune-client`` does, without training."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import Any

import numpy as np

from fedprune.edge_client.uplink import resend_wait
from fedprune.protocol.chunks import Collector, sha256, split_to_fit
from fedprune.protocol.codec import Model, Update, decode_model, encode_update
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import (
    COORDINATOR,
    Chunk,
    Failed,
    Hello,
    Message,
    Notice,
    Offline,
    Phase,
    Round,
    Status,
    Unanswered,
)
from fedprune.protocol.signing import SigningKey, Trust
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

RUN = "fleet"
MAX_PAYLOAD = 256 * 1024  # the coordinator's default --max-payload
SAMPLES = 100  # what each hello declares; updates claim 1..SAMPLES
WINDOW = 64  # publishes a worker sends before waiting for the broker's acknowledgements
MEASURED = {"dense": 1, "pruned": 2}  # the round measured for each update kind


def device_ids(n: int) -> list[str]:
    return [f"dev-{i:05d}" for i in range(n)]


def device_key(device_id: str) -> SigningKey:
    """A device's signing key, derived from its id (a benchmark's convenience, not a practice)."""
    return SigningKey(hashlib.sha256(f"fedprune-fleet/{device_id}".encode()).digest())


@dataclass(kw_only=True)
class Pending:
    """An update sent and not yet answered by the coordinator's notice."""

    round: Round
    session: str
    sha256: str
    chunks: list[tuple[str, Chunk]]
    sent_at: float
    resends: int = 0


class Fleet:
    """Devices that share one MQTT connection: hellos, then an update from each selected device
    on every round, until the coordinator says the run is over."""

    def __init__(self, url: str, ids: list[str], kind: str, trust: Trust, silent: int) -> None:
        self.ids, self.kind, self.trust = ids, kind, trust
        self.answering = ids[: len(ids) - silent]  # the last ``silent`` never answer
        self.keys = {i: device_key(i) for i in ids}
        self.topics = Topics(RUN)
        self.transport = MqttTransport(url, client_id=f"fleet-{ids[0]}", max_payload=MAX_PAYLOAD)
        self.published = 0
        self.pending: dict[tuple[str, int], Pending] = {}  # (device, round): no notice yet
        self.gone: float | None = None  # since when the coordinator's last will says it is away
        self.checked = 0.0  # when the pending updates were last looked at for a resend
        self.collector: Collector = Collector()
        self.models: dict[str, Model] = {}  # the models assembled, by SHA-256
        self.waiting: Round | None = None  # the round to answer once its model is here
        self.current = 0  # the round announced last
        self.answered: set[int] = set()
        self.ended = False

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        self.transport.publish(topic, payload, retain=retain)
        self.published += 1
        if self.published % WINDOW == 0 and not self.transport.flush(timeout=120):
            raise RuntimeError("the broker did not acknowledge a worker's publishes in 120 s")
        return len(payload)

    def hello(self) -> None:
        for device_id in self.ids:
            hello = Hello(
                client_id=device_id, profile="generic-x86-64", num_samples=SAMPLES, backend="keras"
            )
            self.publish(
                self.topics.client_status(device_id), self._signed(hello, device_id), retain=True
            )
        self.transport.flush(timeout=120)

    def _signed(self, message: Any, device_id: str, session: str = "") -> bytes:
        """``message`` as ``device_id``'s, answering coordinator session ``session``."""
        return encode(
            message, run=RUN, sender=device_id, signer=self.keys[device_id], session=session
        )

    def serve(self, report: Queue[Any]) -> None:
        """Answer every round until the coordinator finishes (or aborts) the run; resend, as
        devices do, an update whose notice has not come ``resend_wait`` seconds after it was
        sent (then twice as long), while its round is the current one."""
        topics = self.topics
        for pattern in (topics.status, topics.round, topics.all_models, topics.inbox("+")):
            self.transport.subscribe(pattern)
        self.hello()
        report.put(("ready", len(self.ids)))
        last_message = time.monotonic()
        while not self.ended:
            self.resend(report)
            item = self.transport.get(timeout=1.0)
            if item is None:
                if time.monotonic() - last_message > 600:
                    raise RuntimeError("no message from the coordinator in 600 s")
                continue
            last_message = time.monotonic()
            if item[1]:
                self.on_message(item[0], decode(item[1], self.trust).message)
            waiting = self.waiting
            if waiting is not None and waiting.model.sha256 in self.models:
                started = time.perf_counter()
                count, sent = self.answer(waiting, self.models[waiting.model.sha256])
                report.put(("round", waiting.round, count, sent, time.perf_counter() - started))
                self.answered.add(waiting.round)
                self.waiting = None

    def on_message(self, topic: str, message: Message) -> None:
        """One message of the coordinator's: its status or last will, a notice, a model chunk,
        a round announcement."""
        if isinstance(message, Status) and message.phase in (Phase.FINISHED, Phase.ABORTED):
            self.ended = True
        elif isinstance(message, Offline):
            self.gone = self.gone or time.monotonic()  # the coordinator's last will
        elif isinstance(message, Status) and self.gone is not None:
            for pending in self.pending.values():  # away time does not count
                pending.sent_at += time.monotonic() - max(self.gone, pending.sent_at)
            self.gone = None
        elif isinstance(message, Notice):
            self.pending.pop((topic.split("/")[-2], message.round), None)
        elif isinstance(message, Chunk) and topic.startswith(f"{self.topics.root}/model/"):
            if (whole := self.collector.add(message)) is not None:
                self.models[sha256(whole)] = decode_model(whole)
        elif isinstance(message, Round):
            self.current = message.round
            if message.round not in self.answered:
                self.waiting = message

    def resend(self, report: Queue[Any]) -> None:
        """Send again the updates of round ``current`` whose notice is overdue, each after its
        hello says so (``Hello.unanswered``), as ``EdgeClient`` does: those of the current
        round."""
        now = time.monotonic()
        if self.gone is not None or now - self.checked < 1.0:
            return  # away: its session keeps what was sent; or looked less than a second ago
        self.checked = now
        for (device_id, round_), pending in list(self.pending.items()):
            wait = resend_wait(pending.round, pending.resends)
            if round_ != self.current or now - pending.sent_at < wait:
                continue
            pending.resends += 1
            claim = Unanswered(
                session=pending.session,
                round=round_,
                sha256=pending.sha256,
                resends=pending.resends,
            )
            hello = Hello(
                client_id=device_id,
                profile="generic-x86-64",
                num_samples=SAMPLES,
                backend="keras",
                unanswered=claim,
            )
            self.publish(
                self.topics.client_status(device_id), self._signed(hello, device_id), retain=True
            )
            sent = sum(
                self.publish(t, self._signed(c, device_id, pending.session))
                for t, c in pending.chunks
            )
            pending.sent_at = time.monotonic()
            report.put(("resent", round_, 1, sent))

    def answer(self, announcement: Round, model: Model) -> tuple[int, int]:
        """Every selected device's update (or, in the pruned run's warm-up, its failure): how
        many devices sent one, and the bytes published."""
        round_ = announcement.round
        warm_up = self.kind == "pruned" and round_ < MEASURED["pruned"]
        rng = np.random.default_rng(round_ * 1000 + int(self.ids[0].split("-")[1]))
        deltas = [rng.normal(0.0, 1e-3, w.shape).astype(np.float32) for w in model.weights]
        count = sent = 0
        for device_id in self.answering:
            if not announcement.selects(device_id):
                continue
            prefix = self.topics.update(device_id, round_)
            number = int(device_id.split("-")[1])
            if warm_up:
                failed = Failed(round=round_, reason="warm-up round of the benchmark")
                signed = self._signed(failed, device_id, announcement.session)
                sent += self.publish(f"{prefix}/failed", signed)
                count += 1
                continue
            deltas[-1].flat[0] = number * 1e-6  # the last bias is never masked: a distinct update
            update = Update(
                round=round_,
                num_samples=1 + number % SAMPLES,
                deltas=deltas,
                metrics={"loss": 1.0, "accuracy": 0.5, "n_eval": 0.0},
            )
            payload = encode_update(update, model.masks)
            chunks = [
                (f"{prefix}/{c.index}", c) for c in split_to_fit(payload, max_payload=MAX_PAYLOAD)
            ]
            for topic, chunk in chunks:
                sent += self.publish(topic, self._signed(chunk, device_id, announcement.session))
            self.pending[(device_id, round_)] = Pending(
                round=announcement,
                session=announcement.session,
                sha256=sha256(payload),
                chunks=chunks,
                sent_at=time.monotonic(),
            )
            count += 1
        if not self.transport.flush(timeout=120):
            raise RuntimeError("the broker did not acknowledge a worker's updates in 120 s")
        return count, sent


def worker(
    url: str, ids: list[str], kind: str, coordinator_key: str, silent: int, report: Queue[Any]
) -> None:
    trust = Trust.of({COORDINATOR: SigningKey(bytes.fromhex(coordinator_key)).verify_key})
    fleet = Fleet(url, ids, kind, trust, silent)
    try:
        fleet.serve(report)
        report.put(("done", fleet.published))
    except Exception as exc:  # the parent reports it and stops the run
        report.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        fleet.transport.close()
