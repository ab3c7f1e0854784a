"""What the coordinator receives, handled: a device's status (hello, last will), an update's
chunks, an aggregator's tally or partial sum, each routed to the part that owns it; and, between
messages, the broker connection's events and the devices' keys read again."""

from __future__ import annotations

from fedprune.coordinator.fleet import Change, needs_artifact
from fedprune.coordinator.parts import Parts
from fedprune.protocol.messages import Hello, Notice


class Inbox:
    """Routes each message the coordinator receives (``Coordinator.pump`` takes them here)."""

    def __init__(self, parts: Parts) -> None:
        self.transport, self.topics, self.fleet = parts.transport, parts.topics, parts.fleet
        self.observer, self.intake, self.partials = parts.observer, parts.intake, parts.partials
        self.downlink, self.spec, self.keys = parts.downlink, parts.spec, parts.keys

    def pump(self, timeout: float) -> bool:
        """Handle one message if one arrives within ``timeout`` seconds; ``False`` if none did."""
        for event in self.transport.connection_events():
            self.observer.connection(event)
        self.observer.tick()
        if self.keys is not None:
            for client_id in self.intake.reload_keys(self.keys):
                self.observer.left(client_id)
        item = self.transport.get(timeout)
        if item is None:
            return False
        self.handle(*item)
        return True

    def handle(self, topic: str, payload: bytes) -> None:
        """One message: an update, a device's status, or an aggregator's tally or partial sum."""
        if self.partials is not None and topic.startswith(self.partials.root):
            self.partials.on_message(topic, payload, self.intake.current)
        elif (parsed := self.topics.parse_update(topic)) is not None:
            self.intake.on_message(parsed[0], parsed[1], payload)
        elif (client_id := self.topics.client_of_status(topic)) is not None:
            change = self.fleet.on_status(
                client_id, payload, self.intake.trust, run=self.topics.run
            )
            if change is not None:
                self._changed(change)

    def _changed(self, change: Change) -> None:
        """A device said hello (joined, came back, installed a model) or went offline."""
        hello = change.hello
        if hello is None:
            self.observer.left(change.client_id)
            return
        if change.joined:
            self._joined(hello)
        self.intake.claimed(hello.client_id, hello.unanswered)
        self.observer.hello(hello)

    def _joined(self, hello: Hello) -> None:
        """A device joined: it got what is retained, and the artifact again in chunks it takes
        if it needs smaller ones. A device that cannot use the run's codec is told (it is never
        selected)."""
        needs = needs_artifact(hello.backend) and bool(self.spec.artifact)
        self.downlink.joined(hello, artifact=needs)
        if needs:
            self.spec.joined(self.fleet.fit([hello]))
        if (unable := self.fleet.cannot_follow(hello)) is not None:
            self.downlink.notify(hello.client_id, Notice(round=0, accepted=False, reason=unable))
