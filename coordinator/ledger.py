"""The coordinator's ledger of devices and its recent events, as monitors see them.

What devices say reaches this ledger (their profile, a reason with their id in it), so it is
bounded: at most ``max_devices`` rows (the oldest offline ones make room), texts cut to
:data:`TEXT` characters, the last :data:`EVENTS` events.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fedprune.protocol.codec import Update
from fedprune.protocol.messages import Hello
from fedprune.protocol.telemetry import DeviceRow, Event

log = logging.getLogger("fedprune.coordinator")

EVENTS = 40
"""How many recent events the ledger keeps."""

MAX_DEVICES = 10_000
"""Rows the ledger keeps by default; a new device beyond them replaces the longest-gone one."""

TEXT = 200
"""The longest text (a profile, a reason, an event) the ledger keeps."""


def _short(text: str) -> str:
    return text if len(text) <= TEXT else text[: TEXT - 1] + "…"


class Ledger:
    """Every device seen in this run (online or not) and what it did; plus the latest events.
    ``clock`` gives the wall-clock time of each change."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, max_devices: int = MAX_DEVICES
    ) -> None:
        self._clock = clock
        self.max_devices = max_devices
        self._rows: dict[str, DeviceRow] = {}
        self.events: deque[Event] = deque(maxlen=EVENTS)
        self._exports: dict[str, float | None] = {}  # deployed model SHA-256 -> its score
        self._full = False

    def restore(self, rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        """Take back a checkpoint's rows (every device offline until it says hello again) and
        events."""
        for row in rows[: self.max_devices]:
            self._rows[row["id"]] = dataclasses.replace(DeviceRow(**row), online=False)
        self.events.extend(Event(**event) for event in events)

    def event(self, kind: str, text: str, device: str = "") -> None:
        self.events.append(Event(time=self._clock(), kind=kind, text=_short(text), device=device))

    def rows(self) -> list[DeviceRow]:
        return [row for _, row in sorted(self._rows.items())]

    def __len__(self) -> int:
        return len(self._rows)

    def _set(self, client_id: str, **changes: object) -> None:
        row = self._rows.get(client_id)
        if row is not None:
            self._rows[client_id] = dataclasses.replace(row, **changes)  # type: ignore[arg-type]

    def _room(self) -> bool:
        """Whether a new row fits, after forgetting the longest-gone offline device if need be."""
        if len(self._rows) < self.max_devices:
            return True
        gone = [row for row in self._rows.values() if not row.online]
        if not gone:
            if not self._full:
                log.warning("the device ledger is full (%d online devices)", self.max_devices)
                self._full = True
            return False
        del self._rows[min(gone, key=lambda row: row.last_seen).id]
        return True

    def hello(self, hello: Hello) -> None:
        now, client_id = self._clock(), hello.client_id
        row = self._rows.get(client_id)
        if row is None:
            if not self._room():
                return
            row = self._rows[client_id] = DeviceRow(
                id=client_id,
                profile="",
                trainer="",
                samples=0,
                online=True,
                joined=now,
                last_seen=now,
            )
            self.event(
                "join", f"{hello.profile}, {hello.num_samples} samples, {hello.backend}", client_id
            )
        elif not row.online:
            self.event("join", "back online", client_id)
        new_model = hello.installed is not None and hello.installed != row.model
        self._set(
            client_id,
            profile=_short(hello.profile),
            trainer=_short(hello.backend),
            samples=hello.num_samples,
            online=True,
            last_seen=now,
        )
        if hello.installed is not None:
            installed = _short(hello.installed)
            self._set(client_id, model=installed, model_accuracy=self._exports.get(installed))
            if new_model and installed in self._exports:
                self.event("install", f"runs the deployed model {installed[:12]}", client_id)

    def left(self, client_id: str) -> None:
        if client_id in self._rows:
            self._set(client_id, online=False, last_seen=self._clock())
            self.event("leave", "went offline", client_id)

    def selected(self, client_ids: list[str], bytes_down: int) -> None:
        for client_id in client_ids:
            row = self._rows.get(client_id)
            if row is not None:
                self._set(
                    client_id, selected=row.selected + 1, bytes_down=row.bytes_down + bytes_down
                )

    def received(self, client_id: str, nbytes: int) -> None:
        row = self._rows.get(client_id)
        if row is not None:
            self._set(client_id, bytes_up=row.bytes_up + nbytes, last_seen=self._clock())

    def accepted(self, client_id: str, update: Update) -> None:
        row = self._rows.get(client_id)
        if row is None:
            return
        metrics = update.metrics
        self._set(
            client_id,
            reported=row.reported + 1,
            last_seen=self._clock(),
            train_seconds=metrics.get("train_seconds"),
            epochs=None if "epochs" not in metrics else int(metrics["epochs"]),
            batch_size=None if "batch_size" not in metrics else int(metrics["batch_size"]),
            peak_memory_mb=metrics.get("peak_memory_mb"),
            accuracy=metrics.get("accuracy") if metrics.get("n_eval", 0.0) > 0 else None,
        )

    def rejected(self, client_id: str, reason: str, text: str) -> None:
        row = self._rows.get(client_id)
        if row is not None:
            self._set(client_id, rejected=row.rejected + 1, last_reason=_short(f"{reason}: {text}"))
        self.event("reject", f"{reason}: {text}", client_id)

    def late(self, client_ids: list[str], round_: int) -> None:
        for client_id in client_ids:
            row = self._rows.get(client_id)
            if row is not None:
                self._set(client_id, late=row.late + 1)
            self.event("late", f"no update for round {round_} when it closed", client_id)

    def deployed(self, sha256: str, accuracy: float | None) -> None:
        self._exports[sha256] = accuracy
        for client_id, row in self._rows.items():
            if row.model == sha256:
                self._rows[client_id] = dataclasses.replace(row, model_accuracy=accuracy)
