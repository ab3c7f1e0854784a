"""An in-memory broker and transport for unit tests of round logic (no sockets, no threads).

A test helper, kept out of the installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

from fedprune.protocol.transport import Transport, topic_matches


class MemoryBroker:
    """Delivers publishes to matching subscribers synchronously and keeps retained messages."""

    def __init__(self) -> None:
        self.retained: dict[str, bytes] = {}
        self.transports: list[MemoryTransport] = []
        self.log: list[tuple[str, bytes]] = []

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        self.log.append((topic, payload))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for transport in self.transports:
            if any(topic_matches(p, topic) for p in transport.patterns):
                transport.inbox.put((topic, payload))


class MemoryTransport(Transport):
    def __init__(self, broker: MemoryBroker, *, max_payload: int = 256 * 1024) -> None:
        super().__init__(max_payload=max_payload)
        self.broker = broker
        self.patterns: list[str] = []
        broker.transports.append(self)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.broker.route(topic, payload, retain)

    def subscribe(self, pattern: str, qos: int = 1, *, retained: bool = True) -> None:
        self.patterns.append(pattern)
        for topic, payload in list(self.broker.retained.items()) if retained else []:
            if topic_matches(pattern, topic):
                self.inbox.put((topic, payload))

    def unsubscribe(self, pattern: str) -> None:
        self.patterns.remove(pattern)

    def flush(self, timeout: float = 10.0) -> bool:
        return True

    def close(self) -> None:
        self.broker.transports.remove(self)
