"""The terminal view of a telemetry snapshot (rich): header, round in progress, rounds, devices,
events. Times are shown relative to the snapshot's own clock, so a monitor whose clock differs
from the coordinator's still shows them right."""

from __future__ import annotations

import contextlib
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedprune.protocol.messages import Snapshot

ROUNDS_SHOWN = 10
EVENTS_SHOWN = 8


def console(*, record: bool = False) -> Console:
    return Console(record=record, width=WIDE if record else None)


def _num(value: object, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _score(r: dict[str, Any]) -> tuple[str, str]:
    """A round's held-out score and its name: the accuracy, or an autoencoder's AUC."""
    if r.get("accuracy") is None and r.get("auc") is not None:
        return "AUC", _num(r.get("auc"), 3)
    return "accuracy", _num(r.get("accuracy"), 3)


def _kb(n: float) -> str:
    return f"{n / 1024:,.0f} KB" if n < 10 * 1024 * 1024 else f"{n / 1024 / 1024:,.0f} MB"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s ago" if seconds < 90 else f"{seconds / 60:.0f} min ago"


def line(snapshot: Snapshot, coordinator: str) -> str:
    """One line: the run's phase and round, and the last round's figures."""
    run = snapshot.run
    text = f"{run.name}: {run.phase}, round {run.round}/{run.rounds}, coordinator {coordinator}"
    if snapshot.rounds:
        last = snapshot.rounds[-1]
        with contextlib.suppress(KeyError, TypeError, ValueError):
            text += (
                f"; round {int(last['round'])}: {' '.join(_score(last))},"
                f" sparsity {last['sparsity']:.2f},"
                f" {int(last['reported'])}/{int(last['selected'])} reported"
            )
    online = sum(d.online for d in snapshot.devices)
    text += f"; {online}/{run.devices_total} devices online"
    if snapshot.progress is not None and snapshot.progress.overdue:
        text += f"; {len(snapshot.progress.overdue)} update(s) overdue"
    return text


def _header(snapshot: Snapshot, coordinator: str) -> Panel:
    run = snapshot.run
    last = snapshot.rounds[-1] if snapshot.rounds else {}
    online = sum(d.online for d in snapshot.devices)
    deadline = "-"
    if run.deadline is not None:
        deadline = f"in {max(0.0, run.deadline - run.updated):.0f} s"
    facts = Text.assemble(
        ("phase ", "dim"),
        (run.phase, "bold"),
        ("   round ", "dim"),
        (f"{run.round}/{run.rounds}", "bold"),
        (f"   {_score(last)[0]} ", "dim"),
        (_score(last)[1], "bold"),
        ("   sparsity ", "dim"),
        (f"{run.sparsity:.2f}", "bold"),
        (f" (target {run.sparsity_target:.2f})", "dim"),
        ("   devices online ", "dim"),
        (f"{online}/{run.devices_total}", "bold"),
        ("   deadline ", "dim"),
        (deadline, "bold"),
        ("   coordinator ", "dim"),
        (coordinator, "bold red" if coordinator == "offline" else "bold"),
    )
    config = " · ".join(f"{k} {v}" for k, v in run.config.items())
    config += " · signed messages" if run.signed else " · unsigned"
    title = Text.assemble("fedprune run ", (run.name, "bold"), f" (session {run.session})")
    return Panel(Group(facts, Text(config, style="dim")), title=title, title_align="left")


def _progress(snapshot: Snapshot) -> Table | Text:
    p = snapshot.progress
    if p is None:
        return Text("no round in progress", style="dim")
    rejected = ", ".join(f"{k} {v}" for k, v in p.rejected.items()) or "none"
    waiting = [c for c in p.selected if c not in p.reported]
    grid = Table.grid(padding=(0, 2))
    grid.add_row(
        Text(f"round {p.round}", style="bold"),
        ProgressBar(total=max(1, len(p.selected)), completed=len(p.reported), width=40),
        Text(
            f"{len(p.reported)} of {len(p.selected)} selected devices reported;"
            f" rejected: {rejected}; {_kb(p.bytes_up)} received"
        ),
    )
    grid.add_row(
        "",
        "",
        Text("waiting for: " + ", ".join(waiting) if waiting else "all reported", style="dim"),
    )
    if p.overdue:
        grid.add_row("", "", Text(_overdue(p.overdue), style="bold red"))
    return grid


def _overdue(overdue: list[str]) -> str:
    """The devices that say they sent an update the coordinator has not received."""
    return (
        f"overdue: {len(overdue)} update(s) that devices say they sent have not arrived"
        f" (they resend them): {', '.join(overdue)}"
    )


def _rounds(snapshot: Snapshot) -> Table:
    table = Table(title="Rounds", title_justify="left", box=box.SIMPLE_HEAD)
    for column in (
        "round",
        "accuracy/AUC",
        "devices' acc",
        "sparsity",
        "reported",
        "up (sent/dense)",
        "down (sent/dense)",
        "rejected",
        "seconds",
    ):
        table.add_column(column, justify="right")
    for r in snapshot.rounds[-ROUNDS_SHOWN:]:
        try:  # metrics lines are plain maps: one that is not what it should be is left out
            cells = [
                f"{int(r['round'])}",
                _score(r)[1],
                _num(r.get("client_accuracy"), 3),
                f"{r['sparsity']:.2f}",
                f"{int(r['reported'])}/{int(r['selected'])}",
                f"{_kb(r['bytes_up'])} / {_kb(r['dense_bytes_up'])}",
                f"{_kb(r['bytes_down'])} / {_kb(r['dense_bytes_down'])}",
                f"{sum(int(v) for v in dict(r.get('rejected') or {}).values())}",
                f"{r['seconds']:.1f}",
            ]
        except (KeyError, TypeError, ValueError):
            continue
        table.add_row(*cells)
    return table


WIDE = 160
"""Terminals at least this wide get every device column; narrower ones the essential ones."""


def _devices(snapshot: Snapshot, width: int) -> Table:
    total = snapshot.run.devices_total
    shown = len(snapshot.devices)
    title = f"Devices ({shown} of {total} shown)" if shown < total else f"Devices ({total})"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    now = snapshot.run.updated
    rows: list[dict[str, str | Text]] = []
    for d in snapshot.devices:
        seen = (
            Text("online", style="green")
            if d.online
            else Text(f"off, {_ago(now - d.last_seen)}", style="dim")
        )
        rows.append(
            {
                "device": d.id,
                "profile": d.profile,
                "seen": seen,
                "rep/sel": f"{d.reported}/{d.selected}",
                "late": Text(str(d.late), style="red" if d.late else ""),
                "rej": Text(str(d.rejected), style="red" if d.rejected else ""),
                "last reason": d.last_reason,
                "up KB": f"{d.bytes_up / 1024:,.0f}",
                "down KB": f"{d.bytes_down / 1024:,.0f}",
                "trainer": d.trainer,
                "samples": str(d.samples),
                "train s": _num(d.train_seconds, 2),
                "MB": _num(d.peak_memory_mb, 0),
                "acc": _num(d.accuracy, 3),
                "model": "-" if d.model is None else d.model[:8],
            }
        )
    columns = ["device", "profile", "seen", "rep/sel", "late", "rej", "last reason", "up KB"]
    if width >= WIDE:
        columns[2:2] = ["trainer", "samples"]
        columns += ["down KB", "train s", "MB", "acc", "model"]
    for column in columns:
        table.add_column(
            column,
            no_wrap=True,
            overflow="ellipsis",
            max_width=24 if column == "last reason" else None,
        )
    for row in rows:  # as Text: what devices send is never read as markup
        table.add_row(*(Text(v) if isinstance(v, str) else v for v in (row[c] for c in columns)))
    return table


def _events(snapshot: Snapshot) -> Table:
    table = Table(
        title="Recent events", title_justify="left", box=box.SIMPLE_HEAD, show_header=False
    )
    table.add_column("when", style="dim", justify="right")
    table.add_column("what")
    now = snapshot.run.updated
    for e in snapshot.events[-EVENTS_SHOWN:][::-1]:
        who = f" {e.device}" if e.device else ""
        style = "red" if e.kind in ("reject", "drop", "late") else ""
        table.add_row(_ago(now - e.time), Text(f"{e.kind}{who}: {e.text}", style=style))
    return table


def render(snapshot: Snapshot, coordinator: str, *, width: int = WIDE) -> Group:
    """The whole view; ``width`` is the terminal's, which decides the device columns."""
    return Group(
        _header(snapshot, coordinator),
        _progress(snapshot),
        _rounds(snapshot),
        _devices(snapshot, width),
        _events(snapshot),
    )
