"""A round's model as a device fetches it: whole, or as a change to the one it holds.

The coordinator publishes each round's model retained, in chunks, and (protocol 1.7) also as a
change to the last one, for the devices that hold that one. A device that holds the model a
round's change is taken against fetches only the change, rebuilds the model and checks it against
the round's SHA-256; otherwise, or when that fails, it fetches the model whole. The topics it
subscribes to are its own, never taken from a message.
"""

from __future__ import annotations

import logging

from fedprune.protocol.chunks import MAX_ASSEMBLED_BYTES, Collector, sha256
from fedprune.protocol.codec import apply_delta, decode_model, encode_model
from fedprune.protocol.errors import WireError
from fedprune.protocol.messages import Chunk, Round
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import Transport

log = logging.getLogger("fedprune.client")


class ModelDownload:
    """Fetches the model of the rounds a device trains, assembling at most ``max_size`` bytes."""

    def __init__(
        self, transport: Transport, topics: Topics, *, max_size: int = MAX_ASSEMBLED_BYTES
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.max_size = max_size
        self.held: tuple[str, bytes] | None = None  # the newest complete model, by SHA-256
        self._chunks = Collector(max_size=max_size)
        self._pattern: str | None = None  # the model chunks subscribed to

    def too_big(self, round_: Round) -> str | None:
        """Why ``round_``'s model cannot be assembled here (it would be refused chunk by chunk),
        or ``None``."""
        if round_.model.size <= self.max_size:
            return None
        return (
            f"the model of {round_.model.size:,} bytes is over the {self.max_size:,} this device"
            " assembles at most (a quarter of its profile's memory)"
        )

    def fetch(self, round_: Round) -> None:
        """Receive ``round_``'s model instead of the one before: its change when this device
        holds the model it changes, else the whole model."""
        holds = self.held is not None and self.held[0] == round_.base
        topic = self.topics.delta if round_.delta is not None and holds else self.topics.model
        self._subscribe(f"{topic(round_.model_version)}/+")

    def on_chunk(self, chunk: Chunk, round_: Round | None) -> None:
        """A chunk of a model or a change (payloads told apart by their SHA-256)."""
        payload = self._chunks.add(chunk)
        if payload is None:
            return
        if round_ is not None and round_.delta is not None and chunk.sha256 == round_.delta.sha256:
            self._rebuild(round_, payload)
        else:
            self.held = (chunk.sha256, payload)

    def model(self, round_: Round) -> bytes | None:
        """The payload of ``round_``'s model, once it is here."""
        if self.held is None or self.held[0] != round_.model.sha256:
            return None
        return self.held[1]

    def _subscribe(self, pattern: str) -> None:
        if pattern == self._pattern:
            return
        if self._pattern is not None:
            self.transport.unsubscribe(self._pattern)
        self._pattern = pattern
        self._chunks = Collector(max_size=self.max_size)  # a new run may send a model seen before
        self.transport.subscribe(pattern)

    def _rebuild(self, round_: Round, delta: bytes) -> None:
        """The round's model from the one held here and its change; when that fails, or does
        not give the model the round names (by SHA-256), the whole model is fetched."""
        try:
            if self.held is None or self.held[0] != round_.base:
                raise WireError("the model it changes is not the one held here")
            whole = encode_model(apply_delta(decode_model(self.held[1]), delta))
        except WireError as exc:
            why = str(exc)
        else:
            if sha256(whole) == round_.model.sha256:
                self.held = (round_.model.sha256, whole)
                return
            why = "it does not give the round's model (another SHA-256)"
        log.warning(
            "round %d: the model's change cannot be used (%s); fetching it whole", round_.round, why
        )
        self._subscribe(f"{self.topics.model(round_.model_version)}/+")
