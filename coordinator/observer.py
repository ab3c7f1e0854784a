"""What the round loop tells the rest of the coordinator as it happens.

The loop calls one :class:`Observer`; telemetry, Prometheus metrics and anything else that watches
a run each implement the hooks they care about (every hook does nothing by default), and
:class:`Observers` hands each call to all of them. The loop itself stays free of bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedprune.protocol.codec import Update
from fedprune.protocol.messages import Hello, Phase
from fedprune.protocol.transport import ConnectionEvent

if TYPE_CHECKING:
    from fedprune.coordinator.result import RoundResult


class Observer:
    """Hooks of the round loop; times are the coordinator's wall clock (``time.time()``)."""

    def phase(self, phase: Phase, round_: int) -> None:
        """The run entered ``phase`` (at ``round_``)."""

    def hello(self, hello: Hello) -> None:
        """A device said hello (joined, came back, or installed a model)."""

    def left(self, client_id: str) -> None:
        """A device went offline."""

    def round_started(
        self, round_: int, selected: list[str], deadline: float, bytes_down: int
    ) -> None:
        """A round was announced to ``selected``; each gets ``bytes_down`` bytes of model."""

    def received(self, client_id: str, nbytes: int) -> None:
        """An update chunk of ``nbytes`` arrived on ``client_id``'s topic."""

    def accepted(self, client_id: str, update: Update) -> None:
        """A device's update passed validation and went into the aggregate."""

    def rejected(self, client_id: str, reason: str, text: str) -> None:
        """A message on ``client_id``'s topics was refused for ``reason``."""

    def overdue(self, client_id: str, resends: int) -> None:
        """``client_id`` says it resent this round's update for want of a notice, and the
        round has not received it."""

    def connection(self, event: ConnectionEvent) -> None:
        """The coordinator's connection to the broker was lost or restored."""

    def round_ended(self, result: RoundResult, late: list[str]) -> None:
        """A round was aggregated; ``late`` were selected and did not answer in time."""

    def deployed(self, profile: str, sha256: str, accuracy: float | None) -> None:
        """The export for ``profile`` was published to its devices."""

    def tick(self) -> None:
        """Called often from the loop: a chance to do work that is due."""


class Reminding(Observer):
    """Calls ``remind`` from the loop (a :class:`~fedprune.protocol.connection.Reminder`)."""

    def __init__(self, remind: Callable[[], None]) -> None:
        self.remind = remind

    def tick(self) -> None:
        self.remind()


class Observers(Observer):
    """Hands every hook to each of ``observers``, in order."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = list(observers)

    def phase(self, phase: Phase, round_: int) -> None:
        for o in self.observers:
            o.phase(phase, round_)

    def hello(self, hello: Hello) -> None:
        for o in self.observers:
            o.hello(hello)

    def left(self, client_id: str) -> None:
        for o in self.observers:
            o.left(client_id)

    def round_started(
        self, round_: int, selected: list[str], deadline: float, bytes_down: int
    ) -> None:
        for o in self.observers:
            o.round_started(round_, selected, deadline, bytes_down)

    def received(self, client_id: str, nbytes: int) -> None:
        for o in self.observers:
            o.received(client_id, nbytes)

    def accepted(self, client_id: str, update: Update) -> None:
        for o in self.observers:
            o.accepted(client_id, update)

    def rejected(self, client_id: str, reason: str, text: str) -> None:
        for o in self.observers:
            o.rejected(client_id, reason, text)

    def overdue(self, client_id: str, resends: int) -> None:
        for o in self.observers:
            o.overdue(client_id, resends)

    def connection(self, event: ConnectionEvent) -> None:
        for o in self.observers:
            o.connection(event)

    def round_ended(self, result: RoundResult, late: list[str]) -> None:
        for o in self.observers:
            o.round_ended(result, late)

    def deployed(self, profile: str, sha256: str, accuracy: float | None) -> None:
        for o in self.observers:
            o.deployed(profile, sha256, accuracy)

    def tick(self) -> None:
        for o in self.observers:
            o.tick()
