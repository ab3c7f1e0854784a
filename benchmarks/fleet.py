"""A fleet in one round: N simulated devices through a real mosquitto against the real coordinator.

    .venv/bin/python benchmarks/fleet.py [--devices 100 1000 10000] [--updates dense pruned]
        [--repeats 1] [--workers 2] [--json FILE] [--no-deadline] [--cpu-hog N]
        [--pause-coordinator SECONDS] [--round-timeout SECONDS] [--logs DIR]

Per device count, update kind and repeat, on a private mosquitto configured as
``fedprune-provision`` configures one for that many devices (room for a round's backlog, sessions
kept an hour, no persistence), logging at notice level:

1. Every device gets an Ed25519 key (derived from its id, so the workers need no key files); the
   coordinator gets its signing key and a folder of the devices' ``<id>.pub`` verify keys, so every
   message is signed and checked as in production.
2. ``fedprune-coordinator`` runs in its own process (the CNN preset, no held-out set: no
   evaluation or export; ``--min-clients N``). ``--workers`` processes simulate the devices, each
   a share of them over one MQTT connection (the devices' own ``MqttTransport``): each device
   publishes its signed hello, retained; on a round, each worker reads the model from the
   broker, and every device the round's draw selects sends a distinct, valid update built with
   the real codec (``encode_update`` at the model's kept positions, ``split_to_fit``, each chunk
   signed as the device) on its update topic, exactly like ``EdgeClient.send``. No training:
   the deltas are a small random array per worker, with one value set from the device's number,
   so no two payloads are the same.
3. ``dense``: one round of the dense model. ``pruned``: the model is pruned to 80% after round 1
   (``--schedule constant --begin-round 1``), so round 1 is a warm-up in which every device
   reports a ``Failed`` training (a few bytes; the coordinator stops waiting for it) and round 2,
   at 80% sparsity, is measured.
4. Measured: the round's wall time (its announcement to its metrics line, as a separate
   subscriber sees them), the coordinator's CPU time over that span (/proc/PID/stat), its peak
   memory (VmHWM) before and after the round, mosquitto's VmHWM, and exactly-once: the round's
   ``reported`` equals N, nothing is rejected, and the coordinator's ``bytes_up`` equals the
   bytes the workers published.

The simulated devices answer as ``fedprune-client`` does: an update without a notice after
``resend_wait`` seconds (half the round, at least a minute, while the coordinator is online) is
sent again, its hello saying so. With ``--cpu-hog N``, N busy processes run beside each run (a
machine busy with other work); with ``--pause-coordinator S`` the coordinator is held still
(SIGSTOP) for S seconds once the measured round's updates are on their way. Counted too: updates
the round did not count (lost), resends, and the times mosquitto's log says it dropped the
coordinator (``--logs DIR`` keeps both logs).

Then, unless ``--no-deadline``: a round that one selected device never answers (20 devices, a
10 s ``--round-timeout``) ends at its deadline. Prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from typing import IO, Any

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from fleet_watch import (
    Hogs,
    Mosquitto,
    Watcher,
    broker_evidence,
    pause,
    proc_kib,
)
from nacl.encoding import HexEncoder
from processes import QUIET_TF, aggregator, coordinator
from simulated_fleet import MEASURED, RUN, device_ids, device_key, worker

from fedprune.protocol.messages import (
    COORDINATOR,
)
from fedprune.protocol.signing import SigningKey, Trust

PAUSE_AFTER = 1.0  # seconds after the measured round's announcement that --pause-coordinator waits


# -- what the parent measures -------------------------------------------------------------------


@dataclass
class Result:
    devices: int
    updates: str
    round: int
    selected: int
    reported: int
    rejected: dict[str, int]
    bytes_up: int  # what the coordinator counted
    bytes_sent: int  # what the workers published
    update_bytes: int  # per update, mean
    round_s: float  # announcement to metrics line, seen by a separate subscriber
    coordinator_round_s: float  # the round's own ``seconds``
    cpu_ms_per_update: float  # the coordinator's CPU time over the round / reported
    coordinator_hwm_before_mb: float
    coordinator_hwm_mb: float
    broker_hwm_mb: float
    join_s: float  # the workers' first hello to round 1's announcement
    hogs: int = 0  # busy processes beside the run
    pause_s: float = 0.0  # how long the coordinator was held still in the measured round
    load: float = 0.0  # the machine's 1-minute load average when the measured round ended
    lost: int = 0  # updates the devices sent that the round did not count
    broker_timeouts: int = 0  # times mosquitto dropped the coordinator for its keepalive
    broker_dropped: int = 0  # mosquitto's notices that it dropped messages for the coordinator
    resends: int = 0  # updates the devices sent again for want of a notice

    @property
    def exactly_once(self) -> bool:
        """Every update counted once, none refused, and every byte sent counted (a resend may
        arrive after the round closed: then its bytes are not the round's)."""
        counted = (
            self.bytes_up == self.bytes_sent
            if not self.resends
            else (self.bytes_up <= self.bytes_sent)
        )
        return self.reported == self.devices and not self.rejected and counted


def collect(report: Queue[Any], workers: int) -> list[tuple[Any, ...]]:
    """The workers' reports, until each has said it is done (or failed)."""
    messages: list[tuple[Any, ...]] = []
    while sum(m[0] in ("done", "error") for m in messages) < workers:
        messages.append(report.get(timeout=120))
    return messages


def keep_logs(folder: Path, logs: Path | None, prefix: str) -> None:
    """Copy the run's broker and coordinator logs into ``logs`` (if given)."""
    if logs is None:
        return
    logs.mkdir(parents=True, exist_ok=True)
    for name in ("mosquitto.log", "coordinator.log"):
        if (folder / name).exists():
            shutil.copy(folder / name, logs / f"{prefix}-{name}")


def keys_for(folder: Path, ids: list[str]) -> SigningKey:
    """The devices' verify keys in ``folder/device-keys`` and the coordinator's signing key in
    ``folder/coordinator.key``, as provisioning lays them out; the coordinator's key."""
    keys = folder / "device-keys"
    keys.mkdir()
    for device_id in ids:
        (keys / f"{device_id}.pub").write_bytes(device_key(device_id).verify_key.encode(HexEncoder))
    coordinator_key = SigningKey.generate()
    (folder / "coordinator.key").write_bytes(coordinator_key.encode(HexEncoder))
    return coordinator_key


def start_coordinator(
    url: str,
    folder: Path,
    n: int,
    measured: int,
    round_timeout: float,
    aggregators: int,
    profile: Path | None,
    log: IO[bytes],
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
    """The coordinator of ``n`` signed devices (``measured`` rounds, pruned from round 1) and
    its ``aggregators``, logging to ``log``; under cProfile with ``profile``."""
    signed = ["--signing-key", str(folder / "coordinator.key")]
    signed += ["--device-keys", str(folder / "device-keys")]
    argv = coordinator(
        url,
        *signed,
        "-q",
        run=RUN,
        out=folder / "runs",
        min_clients=n,
        join_timeout=900,
        rounds=measured,
        schedule="constant",
        target=0.8,
        begin_round=1,
        round_timeout=round_timeout,
        aggregators=aggregators,
        aggregation="fedavg",  # a signed run's default is a robust rule that keeps every update
    )
    if profile:
        argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=QUIET_TF)
    helpers = [
        subprocess.Popen(
            aggregator(url, *signed, "-q", run=RUN, id=f"agg-{k}"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for k in range(aggregators)
    ]
    return process, helpers


def run_once(
    n: int,
    kind: str,
    *,
    workers: int,
    silent: int = 0,
    round_timeout: float = 600.0,
    profile: Path | None = None,
    broker_url: str | None = None,
    aggregators: int = 0,
    hogs: int = 0,
    pause_s: float = 0.0,
    logs: Path | None = None,
) -> Result:
    """One coordinator run with ``n`` devices; on ``broker_url`` if given (then the broker's
    memory is not measured), else on a private mosquitto. With ``aggregators``, that many
    ``fedprune-aggregator`` processes take the updates (a shared subscription) and the
    coordinator adds their partial sums. ``hogs`` busy processes run beside it; with
    ``pause_s`` the coordinator is held still for that long once the measured round's first
    updates are on their way. ``logs`` keeps the broker's and the coordinator's logs."""
    measured = MEASURED[kind]
    with tempfile.TemporaryDirectory(prefix="fedprune-fleet-") as tmp:
        folder = Path(tmp)
        ids = device_ids(n)
        coordinator_key = keys_for(folder, ids)
        trust = Trust.of({COORDINATOR: coordinator_key.verify_key})
        broker = None if broker_url else Mosquitto(folder, n)
        url = broker.url if broker is not None else str(broker_url)
        context = multiprocessing.get_context("spawn")
        report: Queue[Any] = context.Queue()
        shares = [ids[k::workers] for k in range(workers)]
        processes = [
            context.Process(
                target=worker,
                args=(
                    url,
                    share,
                    kind,
                    coordinator_key.encode().hex(),
                    silent if k == 0 else 0,
                    report,
                ),
            )
            for k, share in enumerate(shares)
        ]
        hog = Hogs(hogs)
        log = (folder / "coordinator.log").open("wb")
        coordinator_process, helpers = start_coordinator(
            url, folder, n, measured, round_timeout, aggregators, profile, log
        )
        watcher = Watcher(url, trust, coordinator_process.pid)
        started = time.perf_counter()
        for process in processes:
            process.start()
        pauser = threading.Thread(
            target=lambda: (
                watcher.wait_announced(measured, PAUSE_AFTER)
                and pause(coordinator_process.pid, pause_s)
            ),
            daemon=True,
        )
        if pause_s:
            pauser.start()
        try:
            watcher.wait_for(measured, lambda: coordinator_process.poll() is None, timeout=1800)
            broker_hwm = proc_kib(broker.process.pid, "VmHWM") if broker is not None else 0
            load = os.getloadavg()[0]
            coordinator_process.wait(120)
            messages = collect(report, workers)
        except BaseException:
            coordinator_process.kill()
            for process in [*processes, *helpers]:
                process.kill()
            print((folder / "coordinator.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            for helper in helpers:
                try:
                    helper.wait(30)
                except subprocess.TimeoutExpired:
                    helper.kill()
            log.close()
            for process in processes:
                process.join(30)
            watcher.transport.close()  # before the broker goes, so that it does not say so
            if broker is not None:
                broker.stop()
            hog.stop()
            keep_logs(folder, logs, f"{n}-{kind}")
        evidence = broker_evidence(folder / "mosquitto.log", f"fedprune-coordinator-{RUN}")
        errors = [m[1] for m in messages if m[0] == "error"]
        if errors:
            raise RuntimeError(f"a worker failed: {errors[0]}")
        sent = sum(m[3] for m in messages if m[0] == "round" and m[1] == measured)
        answered = sum(m[2] for m in messages if m[0] == "round" and m[1] == measured)
        resent = [m for m in messages if m[0] == "resent" and m[1] == measured]
        first_announced = watcher.announced[1][0]
        start, cpu_start, hwm_before = watcher.announced[measured]
        end, cpu_end, hwm_after, values = watcher.ended[measured]
        reported = int(values["reported"])
        return Result(
            devices=n,
            updates=kind,
            round=measured,
            selected=int(values["selected"]),
            reported=reported,
            rejected=dict(values["rejected"]),
            bytes_up=int(values["bytes_up"]),
            bytes_sent=sent + sum(m[3] for m in resent),
            update_bytes=sent // max(1, answered),
            resends=len(resent),
            round_s=end - start,
            coordinator_round_s=float(values["seconds"]),
            cpu_ms_per_update=1000 * (cpu_end - cpu_start) / max(1, reported),
            coordinator_hwm_before_mb=hwm_before / 1024,
            coordinator_hwm_mb=hwm_after / 1024,
            broker_hwm_mb=broker_hwm / 1024,
            join_s=first_announced - started,
            hogs=hogs,
            pause_s=pause_s,
            load=load,
            lost=max(0, answered - reported),
            broker_timeouts=evidence["timeouts"],
            broker_dropped=evidence["dropped_notices"],
        )


# -- the report ----------------------------------------------------------------------------------

COLUMNS = [
    ("devices", "devices", "{:,}"),
    ("updates", "updates", "{}"),
    ("update_bytes", "bytes per update", "{:,}"),
    ("round_s", "round wall s", "{:.1f}"),
    ("wall_ms_per_update", "wall ms / update", "{:.2f}"),
    ("cpu_ms_per_update", "coordinator CPU ms / update", "{:.2f}"),
    ("coordinator_hwm_before_mb", "coordinator peak MB before round", "{:.0f}"),
    ("coordinator_hwm_mb", "coordinator peak MB", "{:.0f}"),
    ("broker_hwm_mb", "mosquitto peak MB", "{:.0f}"),
    ("join_s", "start to round 1 s", "{:.1f}"),
    ("hogs", "busy processes beside", "{}"),
    ("load", "load average", "{:.1f}"),
    ("lost", "updates lost", "{:,}"),
    ("resends", "resent", "{:,}"),
    ("broker_timeouts", "coordinator dropped by the broker", "{}"),
    ("exactly_once", "exactly once", "{}"),
]


def summary(results: list[Result]) -> dict[str, Any]:
    """Medians over repeats; ``exactly_once`` only if every repeat was."""
    row: dict[str, Any] = {"devices": results[0].devices, "updates": results[0].updates}
    for name in (
        "update_bytes",
        "round_s",
        "cpu_ms_per_update",
        "coordinator_hwm_before_mb",
        "coordinator_hwm_mb",
        "broker_hwm_mb",
        "join_s",
        "load",
    ):
        row[name] = statistics.median(getattr(r, name) for r in results)
    row["hogs"] = results[0].hogs
    row["lost"] = max(r.lost for r in results)
    row["resends"] = max(r.resends for r in results)
    row["broker_timeouts"] = max(r.broker_timeouts for r in results)
    row["wall_ms_per_update"] = 1000 * row["round_s"] / row["devices"]
    checks = [
        f"{r.reported}/{r.devices} reported, rejected {r.rejected or '{}'},"
        f" bytes {r.bytes_up:,} counted / {r.bytes_sent:,} sent"
        for r in results
        if not r.exactly_once
    ]
    row["exactly_once"] = "yes" if not checks else "NO: " + "; ".join(checks)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(f.format(row[k]) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--updates", nargs="+", choices=sorted(MEASURED), default=["dense", "pruned"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="device processes (default: 2)")
    p.add_argument(
        "--broker",
        metavar="URL",
        help="use this broker instead of a private mosquitto (its memory is not measured)",
    )
    p.add_argument(
        "--aggregators",
        type=int,
        default=0,
        metavar="N",
        help="N fedprune-aggregator processes take the updates (pruned only: with mosquitto an "
        "update must be one message)",
    )
    p.add_argument(
        "--cpu-hog",
        type=int,
        default=0,
        metavar="N",
        help="N busy processes run beside each run (a machine busy with other work)",
    )
    p.add_argument(
        "--pause-coordinator",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="hold the coordinator still (SIGSTOP) this long once the measured round's"
        f" updates are on their way ({PAUSE_AFTER:g} s after its announcement)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="the coordinator's --round-timeout (default: 600)",
    )
    p.add_argument(
        "--logs",
        type=Path,
        metavar="DIR",
        help="keep the broker's (notice level) and the coordinator's logs in DIR",
    )
    p.add_argument("--json", type=Path, help="also write every measurement to this file")
    p.add_argument("--no-deadline", action="store_true", help="skip the dead-device round")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the coordinator under cProfile, writing FILE (the last run's)",
    )
    args = p.parse_args(argv)
    rows, everything = [], []
    for n in args.devices:
        for kind in args.updates:
            results = []
            for repeat in range(args.repeats):
                result = run_once(
                    n,
                    kind,
                    workers=min(args.workers, n),
                    profile=args.profile,
                    broker_url=args.broker,
                    aggregators=args.aggregators,
                    hogs=args.cpu_hog,
                    pause_s=args.pause_coordinator,
                    logs=args.logs,
                    round_timeout=args.round_timeout,
                )
                print(
                    f"{n} devices, {kind}, repeat {repeat + 1}: {asdict(result)}",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(result)
            everything.extend(asdict(r) for r in results)
            rows.append(summary(results))
    print(table(rows))
    deadline: dict[str, Any] = {}
    if not args.no_deadline:
        timeout = 10.0
        dead = run_once(20, "dense", workers=1, silent=1, round_timeout=timeout)
        deadline = {
            "devices": 20,
            "silent": 1,
            "round_timeout": timeout,
            "round_s": dead.round_s,
            "reported": dead.reported,
        }
        print(
            f"\nOne of 20 selected devices never answers, --round-timeout {timeout:g}: the round"
            f" ended after {dead.round_s:.1f} s with {dead.reported} of 20 updates."
        )
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "runs": everything, "deadline": deadline}, indent=2)
        )
    return 0 if all(row["exactly_once"] == "yes" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
