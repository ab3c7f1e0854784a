"""What the coordinator tells its monitors: the records of a ``Snapshot``.

The coordinator publishes one snapshot, retained on ``telemetry``, whenever something changes
(at most a few times a second): the run, the round in progress, the last rounds' metrics, a
ledger of devices and the latest events. ``fedprune-monitor`` and the web dashboard show it; they
need nothing else, so a monitor that connects late sees the whole picture at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """The run as a whole; times are seconds since the epoch (the coordinator's clock)."""

    name: str
    session: str  # changes each time a coordinator starts the run
    phase: str  # a wire.Phase value, or a stage between them: exporting, deploying
    round: int  # the round in progress, or the last one
    rounds: int
    deadline: float | None  # of the round in progress
    model_version: int
    sparsity_target: float
    sparsity: float
    started: float
    updated: float
    config: dict[str, Any] = field(default_factory=dict)  # a summary: model, aggregation, ...
    signed: bool = False  # messages are signed and devices must sign theirs
    devices_total: int = (
        0  # devices known, even if the snapshot lists fewer (see messages.Snapshot)
    )


@dataclass(frozen=True, kw_only=True)
class Progress:
    """The round being collected."""

    round: int
    started: float
    deadline: float
    selected: list[str]
    reported: list[str]
    rejected: dict[str, int]  # by reason
    bytes_up: int
    # devices that say they sent this round's update, got no notice and resent it, and whose
    # update has not arrived (1.9): updates lost on the way, or a backlog at the broker
    overdue: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class DeviceRow:
    """One device in the ledger."""

    id: str
    profile: str
    trainer: str
    samples: int
    online: bool
    joined: float
    last_seen: float
    selected: int = 0
    reported: int = 0
    late: int = 0  # selected, and had not answered when the round closed (deadline or quorum)
    rejected: int = 0
    last_reason: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    train_seconds: float | None = None  # of its last accepted update
    epochs: int | None = None  # the local epochs it trained then (its profile may allow fewer)
    batch_size: int | None = None  # and the batch size
    peak_memory_mb: float | None = None  # the process's peak resident memory, as it reported
    accuracy: float | None = None  # on its own held-out samples, last accepted update
    model: str | None = None  # SHA-256 of the deployed model it installed
    model_accuracy: float | None = None  # that export's LiteRT accuracy on the held-out set


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened: a join, a drop, a rejection, a round's end, an install."""

    time: float
    kind: str
    text: str
    device: str = ""


def as_json(record: Any) -> Any:
    """A snapshot (or any record) as JSON-ready data; a non-finite number (a diverged loss)
    becomes ``None``, since JSON has no NaN."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        record = dataclasses.asdict(record)
    if isinstance(record, float) and not math.isfinite(record):
        return None
    if isinstance(record, dict):
        return {k: as_json(v) for k, v in record.items()}
    if isinstance(record, list | tuple):
        return [as_json(v) for v in record]
    return record
