"""A device whose valid account is in an attacker's hands: it joins as a device does (a hello that
declares what it likes), follows the rounds, and answers each with what ``craft`` makes of the
round's model (or what a subclass's ``answer`` sends). Signed with the stolen key when one is
given. A test helper, kept out of the
installed package."""

from __future__ import annotations

import threading
from collections.abc import Callable

import msgpack
import numpy as np

from fedprune.protocol.chunks import Reassembler, split
from fedprune.protocol.codec import Model, Update, decode_model, encode_update
from fedprune.protocol.connection import BrokerSettings
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import Chunk, Hello, Message, Offline, Round
from fedprune.protocol.signing import SigningKey
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

Craft = Callable[[int, Model], tuple[list[np.ndarray], int]]
"""What the attacker sends for a round of a model: its deltas and the samples it claims."""


class StolenDevice(threading.Thread):
    def __init__(
        self,
        broker: str | BrokerSettings,
        *,
        run: str,
        client_id: str,
        rounds: int,
        declared: int,
        craft: Craft | None = None,
        signer: SigningKey | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.topics = Topics(run)
        self.run_name, self.id, self.rounds = run, client_id, rounds
        self.craft, self.signer = craft, signer
        self.transport = MqttTransport(broker, client_id=client_id)
        self.session = ""
        for pattern in (self.topics.round, self.topics.all_models):
            self.transport.subscribe(pattern)
        hello = Hello(
            client_id=client_id, profile="generic-x86-64", num_samples=declared, backend="keras"
        )
        self.transport.publish(
            self.topics.client_status(client_id), self._encode(hello), retain=True
        )
        self.answered: list[int] = []
        self.stop = threading.Event()

    def _encode(self, message: Message) -> bytes:
        return encode(
            message, run=self.run_name, sender=self.id, session=self.session, signer=self.signer
        )

    def send(self, round_: int, payload: bytes, *, version: str | None = None) -> None:
        """``payload`` on its update topics of ``round_``, in envelopes of ``version`` if given."""
        for chunk in split(payload, max_chunk=100_000):
            body = self._encode(chunk)
            if version is not None:
                envelope = msgpack.unpackb(body)
                envelope["v"] = version
                body = msgpack.packb(envelope)
            self.transport.publish(f"{self.topics.update(self.id, round_)}/{chunk.index}", body)

    def answer(self, round_: int, model: Model) -> None:
        """What it sends for a round it is selected for: what ``craft`` makes."""
        assert self.craft is not None
        deltas, claim = self.craft(round_, model)
        update = Update(round=round_, num_samples=claim, deltas=deltas)
        self.send(round_, encode_update(update, model.masks))
        self.answered.append(round_)

    def run(self) -> None:
        parts: dict[str, Reassembler] = {}
        models: dict[str, bytes] = {}
        pending: Round | None = None
        while not self.stop.is_set() and len(self.answered) < self.rounds:
            item = self.transport.get(timeout=0.2)
            if item is not None and item[1]:
                message = decode(item[1]).message
                if isinstance(message, Round):
                    pending, self.session = message, message.session
                elif isinstance(message, Chunk):
                    part = parts.setdefault(message.sha256, Reassembler(max_size=10**8))
                    if (payload := part.add(message)) is not None:
                        models[message.sha256] = payload
            if pending is not None and pending.model.sha256 in models:
                if pending.selects(self.id):
                    self.answer(pending.round, decode_model(models[pending.model.sha256]))
                pending = None
        offline = self._encode(Offline(who=self.id))
        self.transport.publish(self.topics.client_status(self.id), offline, retain=True)
        self.transport.flush(5)
        self.transport.close()
