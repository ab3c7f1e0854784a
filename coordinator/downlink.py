"""What the coordinator publishes to its devices, and the bytes the broker delivers to them.

Every message goes out signed through :meth:`Downlink.publish`, which counts what the broker
delivers to devices (``bytes_down``: a message times the devices that receive it); every large
payload (a round's model or its change, the training artifact, a deployment) goes through one
:meth:`Downlink.publish_chunked` and is described by its ``Manifest``. Monitors' telemetry is not
device traffic and is not counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fedprune.coordinator.config import Downlink as DownlinkMode
from fedprune.protocol.chunks import sha256, split_to_fit
from fedprune.protocol.codec import (
    INT8,
    Codec,
    Model,
    ValueFormat,
    apply_delta,
    encode_delta,
    encode_model,
)
from fedprune.protocol.envelope import encode
from fedprune.protocol.messages import (
    COORDINATOR,
    Deployment,
    Hello,
    Manifest,
    Message,
    Notice,
)
from fedprune.protocol.signing import SigningKey
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import Transport

log = logging.getLogger("fedprune.coordinator")


@dataclass(frozen=True, kw_only=True)
class ModelRelease:
    """What a round message says of its model: the whole model's manifest and, when it also goes
    as a change, that change's manifest and the SHA-256 of the model it changes."""

    model: Manifest
    delta: Manifest | None = None
    base: str = ""


class Downlink:
    """Publishes as the coordinator (signed with ``signer``) and counts the bytes delivered."""

    def __init__(
        self, transport: Transport, topics: Topics, *, signer: SigningKey | None, session: str = ""
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.signer = signer
        self.session = session  # the coordinator session every message is bound to (1.10)
        self.bytes_down = 0
        # What a device that joins receives at once (retained): the size of each.
        self.joining = {"spec": 0, "artifact": 0, "status": 0, "round": 0}
        self._model_topics: list[str] = []  # the retained chunks of the current model
        # The model the devices that reported last round hold (the base of the next change, as
        # published) and who they are.
        self.held: tuple[Model, str] | None = None
        self.holders: set[str] = set()

    def encode(self, message: Message) -> bytes:
        return encode(
            message,
            run=self.topics.run,
            sender=COORDINATOR,
            signer=self.signer,
            session=self.session,
        )

    def publish(
        self, topic: str, message: Message, *, retain: bool = True, receivers: int = 0
    ) -> int:
        """Publish; ``receivers`` devices get it (counted in :attr:`bytes_down`). Its size."""
        payload = self.encode(message)
        self.transport.publish(topic, payload, retain=retain)
        self.bytes_down += len(payload) * receivers
        return len(payload)

    def notify(self, client_id: str, notice: Notice) -> None:
        """Tell one device how its update was judged (its inbox, not retained)."""
        self.publish(self.topics.inbox(client_id), notice, retain=False, receivers=1)

    def publish_chunked(
        self, prefix: str, payload: bytes, limit: int, *, receivers: int, retain: bool = True
    ) -> tuple[Manifest, int]:
        """One payload in chunks of at most ``limit`` bytes under ``prefix`` (retained unless
        ``retain`` is false), for ``receivers`` devices; its manifest and the bytes of its chunk
        messages (what one receiver gets)."""
        sent = chunks = 0
        for chunk in split_to_fit(payload, max_payload=limit):
            topic = f"{prefix}/{chunk.index}"
            sent += self.publish(topic, chunk, retain=retain, receivers=receivers)
            chunks += 1
        manifest = Manifest(topic=prefix, size=len(payload), chunks=chunks, sha256=sha256(payload))
        return manifest, sent

    def clear(self, topics: list[str]) -> None:
        """Remove retained messages (an empty retained payload)."""
        for topic in topics:
            self.transport.publish(topic, b"", retain=True)

    def clear_round(self) -> None:
        """Remove the current round's model chunks and announcement (the run is over)."""
        self.clear([*self._model_topics, self.topics.round])
        self._model_topics = []

    def joined(self, hello: Hello, *, artifact: bool) -> None:
        """A device joined: it receives what is retained for it (the artifact if it trains
        with it)."""
        joining = self.joining
        self.bytes_down += joining["spec"] + joining["status"] + joining["round"]
        self.bytes_down += joining["artifact"] if artifact else 0

    def publish_model(
        self,
        version: int,
        model: Model,
        receivers: list[str],
        *,
        limit: int,
        mode: DownlinkMode,
        codec: Codec | None,
    ) -> tuple[ModelRelease, int]:
        """Publish a round's model (retained, in chunks of at most ``limit``) instead of the
        previous version's: whole, and unless ``mode`` is full, as a change to the last published
        model for the receivers that hold it. A change rebuilds a model a little off ``model``
        when it rounds: that one is what is published whole too (every device then holds the
        same weights, and the next change carries what rounding left out). The release and the
        bytes a receiver gets."""
        self.clear(self._model_topics)
        self._model_topics = []
        held = None if mode is DownlinkMode.FULL else self.held
        holders = [] if held is None else [c for c in receivers if c in self.holders]
        delta, base = None, ""
        if held is not None and holders:
            base_model, base = held
            delta = encode_delta(base_model, model, change_codec(codec, mode))
            model = apply_delta(base_model, delta)
        payload = encode_model(model)
        if delta is not None and len(delta) >= len(payload):
            delta, base, holders = None, "", []  # no smaller: everyone fetches it whole
        whole, sent = self._chunked_model(
            self.topics.model(version), payload, limit, receivers=len(receivers) - len(holders)
        )
        change_manifest = None
        if delta is not None:
            change_manifest, more = self._chunked_model(
                self.topics.delta(version), delta, limit, receivers=len(holders)
            )
            sent += more
        self.held = (model, whole.sha256)
        return ModelRelease(model=whole, delta=change_manifest, base=base), sent

    def _chunked_model(
        self, prefix: str, payload: bytes, limit: int, *, receivers: int
    ) -> tuple[Manifest, int]:
        manifest, sent = self.publish_chunked(prefix, payload, limit, receivers=receivers)
        self._model_topics += [f"{prefix}/{i}" for i in range(manifest.chunks)]
        return manifest, sent

    def publish_control(
        self, version: int, payload: bytes, limit: int, *, receivers: int
    ) -> tuple[Manifest, int]:
        """SCAFFOLD's control variate of a round (a model payload), retained with its model."""
        return self._chunked_model(
            self.topics.control(version), payload, limit, receivers=receivers
        )

    def forget_model(self) -> None:
        """No device holds a model of the current shapes (it was rebuilt): the next goes whole."""
        self.held, self.holders = None, set()

    def deploy(self, profile: str, model: bytes, devices: list[Hello], **fields: Any) -> Manifest:
        """Publish an exported model for one device profile to its ``devices``: retained chunks
        in a size they all take (``limit``), then the ``Deployment`` (its other ``fields``)."""
        limit = fields.pop("limit")
        prefix = f"{self.topics.deploy(profile)}/chunks"
        manifest, _ = self.publish_chunked(prefix, model, limit, receivers=len(devices))
        deployment = Deployment(profile=profile, model=manifest, **fields)
        self.publish(self.topics.deploy(profile), deployment, receivers=len(devices))
        return manifest


def change_codec(codec: Codec | None, mode: DownlinkMode) -> Codec:
    """How a model's change travels: the run's codec (``mode`` codec: top-k and zstd too, which
    every receiver has), else int8, or float16/32 when the run's codec keeps values that way."""
    if mode is DownlinkMode.CODEC and codec is not None:
        return codec
    if codec is not None and codec.values in (ValueFormat.F32, ValueFormat.F16):
        return Codec(values=codec.values)
    return INT8
