"""A round's model as a device fetches it: whole, or as a change to the one it holds.

The coordinator publishes each round's model retained, in chunks, and (protocol 1.7) also as a
change to the last one, for the devices that hold that one. A device that holds the model a
round's change is taken against fetches only the change, rebuilds the model and checks it against
the round's SHA-256; otherwise, or when that fails, it fetches the model whole. A SCAFFOLD round
(protocol 1.13) also has a control variate, a model payload fetched beside the model and checked
against the round's SHA-256 in the same way. The topics it subscribes to are its own, never taken
from a message.
"""

from __future__ import annotations

import logging

from fedprune.protocol.chunks import MAX_ASSEMBLED_BYTES, Collector, sha256
from fedprune.protocol.codec import apply_delta, decode_model, encode_model
from fedprune.protocol.errors import WireError
from fedprune.protocol.messages import Chunk, Manifest, Round
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import Transport

log = logging.getLogger("fedprune.client")


class _Feed:
    """One subscription (at most) and the payloads assembled from its chunks."""

    def __init__(self, transport: Transport, max_size: int) -> None:
        self.transport = transport
        self.max_size = max_size
        self.pattern: str | None = None
        self.chunks = Collector(max_size=max_size)

    def subscribe(self, pattern: str | None) -> None:
        """Receive the chunks under ``pattern`` (``None``: none) instead of the previous ones."""
        if pattern == self.pattern:
            return
        if self.pattern is not None:
            self.transport.unsubscribe(self.pattern)
        self.pattern = pattern
        self.chunks = Collector(max_size=self.max_size)  # a new run may send a payload seen before
        if pattern is not None:
            self.transport.subscribe(pattern)

    def carries(self, topic: str) -> bool:
        """Whether ``topic`` is one of this feed's chunks (its pattern ends in ``/+``)."""
        if self.pattern is None:
            return False
        prefix = self.pattern.removesuffix("+")
        return topic.startswith(prefix) and "/" not in topic[len(prefix) :]


class ModelDownload:
    """Fetches the model (and a SCAFFOLD round's control variate) of the rounds a device trains,
    assembling at most ``max_size`` bytes each."""

    def __init__(
        self, transport: Transport, topics: Topics, *, max_size: int = MAX_ASSEMBLED_BYTES
    ) -> None:
        self.transport = transport
        self.topics = topics
        self.max_size = max_size
        self.held: tuple[str, bytes] | None = None  # the newest complete model, by SHA-256
        self.held_control: tuple[str, bytes] | None = None  # the newest control variate
        self._models = _Feed(transport, max_size)
        self._controls = _Feed(transport, max_size)

    def too_big(self, round_: Round) -> str | None:
        """Why ``round_``'s model or control variate cannot be assembled here (it would be
        refused chunk by chunk), or ``None``."""
        for what, manifest in (("model", round_.model), ("control variate", round_.control)):
            if manifest is not None and manifest.size > self.max_size:
                return (
                    f"the {what} of {manifest.size:,} bytes is over the {self.max_size:,} this"
                    " device assembles at most (a quarter of its profile's memory)"
                )
        return None

    def fetch(self, round_: Round) -> None:
        """Receive ``round_``'s model instead of the one before: its change when this device
        holds the model it changes, else the whole model."""
        holds = self.held is not None and self.held[0] == round_.base
        topic = self.topics.delta if round_.delta is not None and holds else self.topics.model
        self._models.subscribe(f"{topic(round_.model_version)}/+")
        control = self.topics.control(round_.model_version)
        self._controls.subscribe(None if round_.control is None else f"{control}/+")

    def on_chunk(self, topic: str, chunk: Chunk, round_: Round | None) -> None:
        """A chunk on ``topic``: of a control variate, or of a model or a change (payloads told
        apart by their SHA-256). One of a control variate given up (an earlier round's, still on
        its way) is dropped: assembled as a model, it would take the held model's place."""
        if self._controls.carries(topic):
            if (control := self._controls.chunks.add(chunk)) is not None:
                self.held_control = (chunk.sha256, control)
            return
        prefix = topic.rpartition("/")[0]
        if prefix.startswith(f"{self.topics.root}/model/") and prefix.endswith("/control"):
            return
        payload = self._models.chunks.add(chunk)
        if payload is None:
            return
        if round_ is not None and round_.delta is not None and chunk.sha256 == round_.delta.sha256:
            self._rebuild(round_, payload)
        else:
            self.held = (chunk.sha256, payload)

    def model(self, round_: Round) -> bytes | None:
        """The payload of ``round_``'s model, once it is here."""
        return _matching(self.held, round_.model)

    def control(self, round_: Round) -> bytes | None:
        """The payload of ``round_``'s control variate, once it is here (``None`` also for a
        round without one)."""
        return _matching(self.held_control, round_.control)

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
        self._models.subscribe(f"{self.topics.model(round_.model_version)}/+")


def _matching(held: tuple[str, bytes] | None, manifest: Manifest | None) -> bytes | None:
    """The payload ``held`` when it is the one ``manifest`` names (by SHA-256)."""
    if held is None or manifest is None or held[0] != manifest.sha256:
        return None
    return held[1]
