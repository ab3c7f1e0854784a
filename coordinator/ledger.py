"""The coordinator's ledger of devices and its recent events, as monitors see them."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fedprune.edge_client.codec import Update
from fedprune.edge_client.telemetry import DeviceRow, Event
from fedprune.edge_client.wire import Hello

EVENTS = 40
"""How many recent events the ledger keeps."""


@dataclass(kw_only=True)
class _Device:
    row: DeviceRow

    def update(self, **changes: object) -> None:
        self.row = dataclasses.replace(self.row, **changes)  # type: ignore[arg-type]


class Ledger:
    """Every device seen in this run (online or not) and what it did; plus the latest events.
    ``clock`` gives the wall-clock time of each change."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._devices: dict[str, _Device] = {}
        self.events: deque[Event] = deque(maxlen=EVENTS)
        self._exports: dict[str, float] = {}  # deployed model SHA-256 -> its export's accuracy

    def event(self, kind: str, text: str, device: str = "") -> None:
        self.events.append(Event(time=self._clock(), kind=kind, text=text, device=device))

    def rows(self) -> list[DeviceRow]:
        return [d.row for _, d in sorted(self._devices.items())]

    def __len__(self) -> int:
        return len(self._devices)

    def online(self) -> int:
        return sum(d.row.online for d in self._devices.values())

    def _seen(self, client_id: str, **changes: object) -> None:
        device = self._devices.get(client_id)
        if device is not None:
            device.update(last_seen=self._clock(), **changes)

    def hello(self, hello: Hello) -> None:
        now = self._clock()
        device = self._devices.get(hello.client_id)
        if device is None:
            device = self._devices[hello.client_id] = _Device(row=DeviceRow(
                id=hello.client_id, profile=hello.profile, trainer=hello.backend,
                samples=hello.num_samples, online=True, joined=now, last_seen=now,
            ))  # fmt: skip
            self.event("join", f"{hello.profile}, {hello.num_samples} samples, {hello.backend}",
                       hello.client_id)  # fmt: skip
        elif not device.row.online:
            self.event("join", "back online", hello.client_id)
        new_model = hello.installed is not None and hello.installed != device.row.model
        device.update(profile=hello.profile, trainer=hello.backend, samples=hello.num_samples,
                      online=True, last_seen=now)  # fmt: skip
        if hello.installed is not None:
            device.update(model=hello.installed, model_accuracy=self._exports.get(hello.installed))
        if new_model and hello.installed in self._exports:
            self.event("install", f"runs the deployed model {hello.installed[:12]}",
                       hello.client_id)  # fmt: skip

    def left(self, client_id: str) -> None:
        if client_id in self._devices:
            self._seen(client_id, online=False)
            self.event("leave", "went offline", client_id)

    def selected(self, client_ids: list[str], bytes_down: int) -> None:
        for client_id in client_ids:
            row = self._devices[client_id].row if client_id in self._devices else None
            if row is not None:
                self._devices[client_id].update(
                    selected=row.selected + 1, bytes_down=row.bytes_down + bytes_down
                )

    def received(self, client_id: str, nbytes: int) -> None:
        device = self._devices.get(client_id)
        if device is not None:  # bytes on an unknown id's topic count in the round, not here
            self._seen(client_id, bytes_up=device.row.bytes_up + nbytes)

    def accepted(self, client_id: str, update: Update) -> None:
        device = self._devices.get(client_id)
        if device is None:
            return
        metrics = update.metrics
        self._seen(
            client_id,
            reported=device.row.reported + 1,
            train_seconds=metrics.get("train_seconds"),
            peak_memory_mb=metrics.get("peak_memory_mb"),
            accuracy=metrics.get("accuracy") if metrics.get("n_eval", 0.0) > 0 else None,
        )

    def rejected(self, client_id: str, reason: str, text: str) -> None:
        device = self._devices.get(client_id)
        if device is not None:
            device.update(rejected=device.row.rejected + 1, last_reason=f"{reason}: {text}")
        self.event("reject", f"{reason}: {text}", client_id)

    def late(self, client_ids: list[str], round_: int) -> None:
        for client_id in client_ids:
            device = self._devices.get(client_id)
            if device is not None:
                device.update(late=device.row.late + 1)
            self.event("late", f"no update for round {round_} by its deadline", client_id)

    def deployed(self, sha256: str, accuracy: float) -> None:
        self._exports[sha256] = accuracy
        for device in self._devices.values():
            if device.row.model == sha256:
                device.update(model_accuracy=accuracy)
