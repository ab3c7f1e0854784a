"""What a monitor knows of a run: the coordinator's retained telemetry and its status.

A :class:`Watcher` reads only what the coordinator keeps retained on the broker, so a broker's
read-only monitor account is enough, and takes a message only from the coordinator (signed by it
when the monitor holds its verify key).
"""

from __future__ import annotations

import logging
import time

from fedprune.protocol.envelope import UNSIGNED, receive
from fedprune.protocol.errors import FedpruneError, SenderError, SignatureError, WireError
from fedprune.protocol.messages import COORDINATOR, Offline, Phase, Snapshot, Status
from fedprune.protocol.signing import Trust
from fedprune.protocol.telemetry import as_json
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import Transport

log = logging.getLogger("fedprune.monitor")


class NoRun(FedpruneError):
    """Nothing about the run is on the broker."""


class Watcher:
    """Follows one run's telemetry and its coordinator's status on the broker."""

    def __init__(self, transport: Transport, run: str, *, trust: Trust = UNSIGNED) -> None:
        self.transport = transport
        self.topics = Topics(run)
        self.trust = trust
        self.snapshot: Snapshot | None = None
        # online (waiting or training), finished, aborted, offline (its last will), or unknown
        self.coordinator = "unknown"
        self.dropped = 0
        for topic in (self.topics.telemetry, self.topics.status):
            transport.subscribe(topic)

    def poll(self, timeout: float) -> bool:
        """Handle what arrives within ``timeout`` seconds; ``True`` if the picture changed."""
        item = self.transport.get(timeout)
        if item is None or not item[1]:
            return False
        topic, payload = item
        try:
            message = receive(payload, self.trust, sender=COORDINATOR, run=self.topics.run).message
        except SignatureError as exc:
            self.dropped += 1
            log.warning("dropped a message on %s: %s", topic, exc)
            return False
        except SenderError:
            return False  # on the coordinator's topics only the coordinator speaks
        except WireError as exc:
            log.warning("ignored a message on %s: %s", topic, exc)
            return False
        if isinstance(message, Snapshot):
            self.snapshot = message
        elif isinstance(message, Status):
            finished = message.phase in (Phase.FINISHED, Phase.ABORTED)
            self.coordinator = message.phase.value if finished else "online"
        elif isinstance(message, Offline):
            self.coordinator = "offline"
        else:
            return False
        return True

    def wait(self, seconds: float) -> Snapshot:
        """The first snapshot (retained ones arrive at once), or ``NoRun`` after ``seconds``."""
        end = time.monotonic() + seconds
        while self.snapshot is None and time.monotonic() < end:
            self.poll(min(0.2, max(0.0, end - time.monotonic())))
        if self.snapshot is None:
            raise NoRun(
                f"no telemetry for run {self.topics.run!r} on the broker after {seconds:.0f} s"
                f" (nothing retained on {self.topics.telemetry}): is the run name right, and has"
                " its coordinator started?"
            )
        while self.poll(0.2):  # the status that came with it
            pass
        return self.snapshot

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = as_json(self.snapshot) if self.snapshot is not None else {}
        return {"coordinator": self.coordinator, **data}
