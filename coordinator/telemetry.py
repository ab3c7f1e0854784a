"""The coordinator's live account of a run, published retained for monitors.

:class:`Telemetry` is an :class:`~fedprune.coordinator.observer.Observer`: from the round loop's
hooks it keeps the run's header, the round in progress, the last rounds' metrics and the device
:class:`~fedprune.coordinator.ledger.Ledger`. When something changed it builds one
:class:`~fedprune.protocol.messages.Snapshot`, at most every ``interval`` seconds (and at
once at a round's end or a change of phase), hands it to ``publish`` (the coordinator signs it and
puts it on the ``telemetry`` topic) and to every listener (the web dashboard).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedprune.coordinator.aggregation import Rule, tolerated
from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.ledger import Ledger
from fedprune.coordinator.observer import Observer
from fedprune.protocol.codec import Update
from fedprune.protocol.messages import Hello, Phase, Snapshot
from fedprune.protocol.telemetry import Progress, RunInfo
from fedprune.protocol.transport import ConnectionEvent, Transport

if TYPE_CHECKING:
    from fedprune.coordinator.result import RoundResult

log = logging.getLogger("fedprune.coordinator")

ROUNDS_KEPT = 200
"""The last rounds' metrics a snapshot carries (a whole run, for the runs people make)."""

Listener = Callable[[Snapshot], None]

NOT_ITS_DOING = ("signature", "sender", "replay", "round")
"""Rejections that are events, not marks on the device's row: a message it did not sign or that
names another sender (anyone can forge those on an open broker), one it made for another run or
session (anyone can replay those), and an update for a round that has closed (the device is
already counted late for it)."""


def new_session(now: float) -> str:
    """A session id that sorts after every earlier one of this coordinator's clock: the start
    time in hex, then randomness (devices follow only newer sessions, so an old message replayed
    cannot pull them back)."""
    return f"{int(now):010x}-{uuid.uuid4().hex[:8]}"


def tolerance(config: RunConfig) -> str:
    """What the run's aggregation withstands, in words: how many Byzantine devices of how many
    a round draws (at least)."""
    devices = config.clients_per_round or config.min_clients
    of = f"{devices}" if config.clients_per_round else f"at least {devices}"
    if config.aggregation is Rule.FEDAVG:
        return f"no Byzantine device of {of} a round (fedavg: each update moves the mean)"
    n = tolerated(config.aggregation, devices, config.trim)
    return f"{n} Byzantine device(s) of {of} a round"


def clipping(config: RunConfig) -> str:
    """The norm updates are clipped to (aggregation.NormBound), in words."""
    if config.clip_norm:
        return f"{config.clip_norm:g}"
    if config.clip_multiple:
        return f"{config.clip_multiple:g}x the previous round's median norm"
    return "off"


def config_summary(config: RunConfig) -> dict[str, Any]:
    """What an operator wants to see of a run's configuration, in one line of a header."""
    schedule = config.schedule
    return {
        "model": config.model,
        "aggregation": config.aggregation,
        "tolerates": tolerance(config),
        "clip": clipping(config),
        "schedule": f"{schedule.kind.value} to {schedule.target:g}"
        + (f" ({schedule.structure})" if schedule.structure else ""),
        "min_clients": config.min_clients,
        "clients_per_round": config.clients_per_round or "all",
        "quorum": config.quorum,
        "round_timeout": config.round_timeout,
        "local_epochs": config.local_epochs,
        "optimizer": f"{config.optimizer} lr {config.learning_rate:g}",
    }


class Telemetry(Observer):
    def __init__(
        self,
        config: RunConfig,
        *,
        publish: Callable[[Snapshot], None],
        signed: bool = False,
        interval: float = 0.5,
        clock: Callable[[], float] = time.time,
        session: str = "",
    ) -> None:
        self.config = config
        self.publish = publish
        self.listeners: list[Listener] = []
        self.ledger = Ledger(clock=clock)
        self.session = session or new_session(clock())
        self.signed = signed
        self.interval = interval
        self._clock = clock
        self._phase = Phase.WAITING.value
        self._round = 0
        self._started = clock()
        self._progress: Progress | None = None
        self._rounds: deque[dict[str, Any]] = deque(maxlen=ROUNDS_KEPT)
        self._sparsity = 0.0
        self._dirty = True
        self._sent_at = 0.0
        self.last: Snapshot | None = None

    # -- the loop's hooks ------------------------------------------------------------------------

    def phase(self, phase: Phase, round_: int) -> None:
        self._round = round_
        self.stage(phase.value)

    def stage(self, name: str) -> None:
        """Enter a phase, or a stage the devices need not know of (exporting, deploying)."""
        if name != self._phase:
            self.ledger.event("phase", f"{name} at round {self._round}")
        self._phase = name
        if name != Phase.TRAINING.value:
            self._progress = None
        self._changed(now=True)

    def hello(self, hello: Hello) -> None:
        self.ledger.hello(hello)
        self._changed()

    def left(self, client_id: str) -> None:
        self.ledger.left(client_id)
        self._changed()

    def round_started(
        self, round_: int, selected: list[str], deadline: float, bytes_down: int
    ) -> None:
        self._round = round_
        self.ledger.selected(selected, bytes_down)
        self._progress = Progress(
            round=round_,
            started=self._clock(),
            deadline=deadline,
            selected=list(selected),
            reported=[],
            rejected={},
            bytes_up=0,
        )
        self._changed(now=True)

    def received(self, client_id: str, nbytes: int) -> None:
        self.ledger.received(client_id, nbytes)
        if self._progress is not None:
            self._progress = dataclasses.replace(
                self._progress, bytes_up=self._progress.bytes_up + nbytes
            )
        self._changed()

    def accepted(self, client_id: str, update: Update) -> None:
        self.ledger.accepted(client_id, update)
        if self._progress is not None:
            reported = [*self._progress.reported, client_id]
            overdue = [c for c in self._progress.overdue if c != client_id]
            self._progress = dataclasses.replace(self._progress, reported=reported, overdue=overdue)
        self._changed()

    def overdue(self, client_id: str, resends: int) -> None:
        progress = self._progress
        if progress is not None and client_id not in progress.overdue:
            self._progress = dataclasses.replace(progress, overdue=[*progress.overdue, client_id])
            if len(progress.overdue) % 100 == 0:  # the first, then one in a hundred
                self.ledger.event(
                    "overdue",
                    f"round {progress.round}: {len(progress.overdue) + 1} update(s)"
                    " that devices say they sent have not arrived; they resend them",
                    client_id,
                )
        self._changed()

    def connection(self, event: ConnectionEvent) -> None:
        self.ledger.event("broker", event.detail)
        self._changed(now=True)

    def rejected(self, client_id: str, reason: str, text: str) -> None:
        if reason in NOT_ITS_DOING:
            self.ledger.event("drop", f"{reason}: {text}", client_id)
        else:
            self.ledger.rejected(client_id, reason, text)
        if self._progress is not None:
            rejected = dict(self._progress.rejected)
            rejected[reason] = rejected.get(reason, 0) + 1
            overdue = [
                c for c in self._progress.overdue if c != client_id or reason in NOT_ITS_DOING
            ]
            self._progress = dataclasses.replace(self._progress, rejected=rejected, overdue=overdue)
        self._changed()

    def round_ended(self, result: RoundResult, late: list[str]) -> None:
        self.ledger.late(late, result.round)
        self._progress = None
        self._rounds.append(result.to_dict())
        self._sparsity = result.sparsity
        score = "-" if result.score is None else f"{result.score:.3f}"
        self.ledger.event(
            "round",
            f"round {result.round}: {result.metric} {score}, sparsity {result.sparsity:.2f},"
            f" {result.reported}/{result.selected} reported",
        )
        self._changed(now=True)

    def resume(self, results: list[RoundResult]) -> None:
        """Carry on from a checkpoint's rounds (the ledger is restored apart)."""
        self._rounds.extend(r.to_dict() for r in results)
        if results:
            self._round, self._sparsity = results[-1].round, results[-1].sparsity
            self.ledger.event("resume", f"resumed after round {self._round}")
        self._changed(now=True)

    def deployed(self, profile: str, sha256: str, accuracy: float | None) -> None:
        self.ledger.deployed(sha256, accuracy)
        score = "-" if accuracy is None else f"{accuracy:.4f}"
        self.ledger.event("deploy", f"{profile}: model {sha256[:12]}, score {score}")
        self._changed(now=True)

    def tick(self) -> None:
        if self._dirty and self._clock() - self._sent_at >= self.interval:
            self.send()

    # -- the snapshot ----------------------------------------------------------------------------

    def _changed(self, *, now: bool = False) -> None:
        self._dirty = True
        if now:
            self.send()

    def snapshot(self) -> Snapshot:
        config = self.config
        progress = self._progress
        run = RunInfo(
            name=config.run,
            session=self.session,
            phase=self._phase,
            round=self._round,
            rounds=config.rounds,
            deadline=None if progress is None else progress.deadline,
            model_version=self._round,
            sparsity_target=config.schedule.target,
            sparsity=self._sparsity,
            started=self._started,
            updated=self._clock(),
            config=config_summary(config),
            signed=self.signed,
            devices_total=len(self.ledger),
        )
        return Snapshot(
            run=run,
            progress=progress,
            rounds=list(self._rounds),
            devices=self.ledger.rows(),
            events=list(self.ledger.events),
        )

    def send(self) -> None:
        """Publish a snapshot now and hand it to the listeners."""
        snapshot = self.snapshot()
        self.last = snapshot
        self._dirty, self._sent_at = False, self._clock()
        self.publish(snapshot)
        for listener in self.listeners:
            listener(snapshot)


def publisher(
    transport: Transport, topic: str, encode: Callable[[Snapshot], bytes]
) -> Callable[[Snapshot], None]:
    """What publishes each snapshot retained on ``topic``, made smaller until it fits in one
    message (:func:`fit`), and says once when it had to drop something."""
    trimmed = False

    def publish(snapshot: Snapshot) -> None:
        nonlocal trimmed
        limit = transport.max_payload
        payload, smaller = fit(snapshot, encode, limit)
        if smaller and not trimmed:
            trimmed = True
            log.warning(
                "telemetry is trimmed to fit in one message (%d bytes): it lists fewer devices,"
                " events or rounds",
                limit,
            )
        if not payload:
            log.warning("telemetry does not fit in %d bytes", limit)
            return
        transport.publish(topic, payload, retain=True)

    return publish


FEW_DEVICES = 1000
"""A snapshot with more devices is not encoded whole before it is shrunk: it would not fit in a
message of the usual size anyway (bisection still finds it if it does)."""


def fit(snapshot: Snapshot, encode: Callable[[Snapshot], bytes], limit: int) -> tuple[bytes, bool]:
    """``snapshot`` encoded in at most ``limit`` bytes, made smaller until it fits: the first of
    :func:`shrunk`'s ever smaller snapshots that does, found by bisection (each holds less than
    the one before it, and encoding thousands of devices is what costs). Also whether it had to
    be made smaller; ``b""`` when nothing fits."""
    payload = encode(snapshot) if len(snapshot.devices) <= FEW_DEVICES else b""
    if payload and len(payload) <= limit:
        return payload, False
    smaller = [snapshot]
    while (next_one := shrunk(smaller[-1])) is not None:
        smaller.append(next_one)
    low, high, fitting = (1 if payload else 0), len(smaller), b""  # the first fit in [low, high]
    while low < high:
        middle = (low + high) // 2
        encoded = encode(smaller[middle])
        if len(encoded) <= limit:
            high, fitting = middle, encoded
        else:
            low = middle + 1
    return fitting, high > 0 and len(smaller) > 1


def shrunk(snapshot: Snapshot) -> Snapshot | None:
    """A smaller snapshot: first only the latest events and rounds, then half the devices (those
    in the round and online first; the run's ``devices_total`` still counts them all), then
    shorter lists of the round's devices, then fewer events and rounds; ``None`` when nothing is
    left to drop."""
    events, rounds, devices, progress = (
        snapshot.events,
        snapshot.rounds,
        snapshot.devices,
        snapshot.progress,
    )
    if len(events) > 10 or len(rounds) > 20:
        return dataclasses.replace(snapshot, events=events[-10:], rounds=rounds[-20:])
    if devices:
        busy = set(progress.selected) if progress is not None else set()
        first = sorted(devices, key=lambda d: (d.id not in busy, not d.online, d.id))
        kept = sorted(first[: len(devices) // 2], key=lambda d: d.id)
        return dataclasses.replace(snapshot, devices=kept)
    if progress is not None and (progress.selected or progress.reported):
        half = dataclasses.replace(
            progress,
            selected=progress.selected[: len(progress.selected) // 2],
            reported=progress.reported[: len(progress.reported) // 2],
        )
        return dataclasses.replace(snapshot, progress=half)
    if events or rounds:
        return dataclasses.replace(
            snapshot, events=events[len(events) // 2 + 1 :], rounds=rounds[len(rounds) // 2 + 1 :]
        )
    return None
