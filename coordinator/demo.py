"""``fedprune-demo``: the whole job on one machine with no flags.

Starts a private broker, splits scikit-learn's digits non-IID across N clients, runs N edge
clients as separate processes and the coordinator here, prunes to the target sparsity, exports the
final model to TFLite, checks it with the LiteRT interpreter and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from fedprune import __version__, device_profiles
from fedprune.edge_client.quiet import native_log_filtered
from fedprune.edge_client.task import Task
from fedprune.edge_client.terminal import steps
from fedprune.protocol.connection import BrokerSettings, check_exposure
from fedprune.protocol.errors import ConfigError, FedpruneError, print_error
from fedprune.protocol.messages import Snapshot
from fedprune.protocol.options import add_insecure_argument

PROG = "fedprune-demo"
DEMO_PROFILES = ("raspberry-pi-4", "raspberry-pi-zero-2w", "generic-x86-64")


def parser() -> argparse.ArgumentParser:
    from fedprune.coordinator.cli import add_monitoring_arguments
    from fedprune.coordinator.options import COORDINATOR_ONLY, add_run_arguments

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run federated training with pruning end to end on this machine: a private "
        "MQTT broker, the coordinator and N edge-client processes on non-IID digits, then a "
        "verified TFLite export. No flags needed.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--clients", type=int, default=5, help="edge client processes (default: 5)")
    p.add_argument(
        "--client-profiles",
        default=",".join(DEMO_PROFILES),
        metavar="P1,P2,...",
        help="device profiles the clients announce, in turn; each gets its own verified export "
        "deployed at the end (default: %(default)s)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet alpha of the non-IID split; smaller is more skewed (default: 0.5)",
    )
    p.add_argument(
        "--broker",
        dest="broker_choice",
        metavar="BROKER",
        default="auto",
        help="auto (mosquitto if installed, else the in-process amqtt broker), "
        "mosquitto, amqtt, or the URL of a running broker (default: auto)",
    )
    add_insecure_argument(p)
    add_run_arguments(p, exclude=COORDINATOR_ONLY)
    add_monitoring_arguments(p)
    p.set_defaults(run="", round_timeout=60.0)
    return p


@contextlib.contextmanager
def _broker(choice: str) -> Iterator[tuple[str, str]]:
    if "://" in choice:
        yield choice, "external"
        return
    from fedprune.coordinator.broker import EmbeddedBroker

    with EmbeddedBroker(choice) as broker:
        yield broker.url, f"embedded {broker.kind}"


def _start_clients(
    paths: list[Path], url: str, run: str, run_dir: Path, profiles: list[str], insecure: bool
) -> list[subprocess.Popen[bytes]]:
    """One client process per data file; client i gets profile i modulo the list."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    processes = []
    for i, path in enumerate(paths):
        command = [
            sys.executable,
            "-m",
            "fedprune.edge_client",
            "--broker",
            url,
            "--data",
            str(path),
            "--run",
            run,
            "--id",
            f"client-{i}",
            "--seed",
            str(i),
            "--profile",
            profiles[i % len(profiles)],
            "--models",
            str(run_dir / "devices" / f"client-{i}"),
            "--cache",
            str(run_dir / "devices" / f"client-{i}" / "cache"),
            *(["--insecure"] if insecure else []),
        ]
        with (logs / f"client-{i}.log").open("wb") as log_file:
            processes.append(
                subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            )
    return processes


def _doing(snapshot: Snapshot) -> str:
    """What the run is doing, for the progress bar."""
    run = snapshot.run
    if run.phase == "waiting":
        return f"waiting for the clients ({sum(d.online for d in snapshot.devices)} online)"
    if run.phase == "training":
        progress = snapshot.progress
        done = "" if progress is None else f" ({len(progress.reported)}/{len(progress.selected)})"
        return f"round {run.round}{done}"
    return run.phase


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    started = time.perf_counter()
    run = args.run or time.strftime("demo-%Y%m%d-%H%M%S")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with native_log_filtered():
            from fedprune.coordinator import digits, session
        from fedprune.coordinator.cli import monitoring
        from fedprune.coordinator.options import config_from
        from fedprune.coordinator.progress import round_line, summary_lines

        run_dir = Path(args.out) / run
        heldout = run_dir / "data" / "heldout.npz"
        config = config_from(args, run=run, min_clients=args.clients, heldout=str(heldout))
        profiles = args.client_profiles.split(",")
        for profile in profiles:
            device_profiles.load(profile)  # a bad name fails here, not in five client processes
        if args.clients < 1 or args.alpha <= 0:
            raise ConfigError(
                f"need --clients >= 1 and --alpha > 0, got {args.clients}, {args.alpha}"
            )
        normal = digits.NORMAL_DIGITS if session.task(config) is Task.RECONSTRUCT else None
        paths, _ = digits.write_demo_data(
            run_dir / "data",
            args.clients,
            alpha=args.alpha,
            seed=args.seed,
            normal=normal,
        )
        with _broker(args.broker_choice) as (url, kind):
            exposed = check_exposure(BrokerSettings.load(url), signed=False, insecure=args.insecure)
            if exposed:
                logging.getLogger("fedprune.coordinator").warning("%s", exposed)
            print(
                f"fedprune demo: run {run}, {args.clients} clients on non-IID digits "
                f"(alpha {args.alpha}"
                + ("" if normal is None else "; normal 0-4, the held-out 5-9 are anomalies")
                + f"), broker {kind} at {url}",
                flush=True,
            )
            processes = _start_clients(paths, url, run, run_dir, profiles, args.insecure)
            with monitoring(args, config) as extra, steps(config.rounds, "starting") as bar:
                extra["listeners"].append(lambda snapshot: bar.describe(_doing(snapshot)))
                summary = session.run(
                    dataclasses.replace(config, broker=url),
                    on_round=lambda r: bar.advance(round_line(r)),
                    **extra,
                )
            for process in processes:  # each may wait up to 60 s for its deployed model
                try:
                    process.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    process.kill()
        for line in summary_lines(summary, seconds=time.perf_counter() - started):
            print(line)
        from fedprune.coordinator import report

        try:
            print(f"  report     {report.write(summary.run_dir)} (open it in a browser)")
        except (FedpruneError, OSError) as exc:  # the run itself went well: say it, go on
            print(f"  report     not written: {exc}")
    except (FedpruneError, device_profiles.ProfileError, OSError) as exc:
        return print_error(PROG, exc)
    except KeyboardInterrupt:
        return 130
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    failed = [i for i, p in enumerate(processes) if p.returncode != 0]
    if failed:
        print(f"{PROG}: error: client(s) {failed} failed; see {run_dir / 'logs'}", file=sys.stderr)
        return 1
    return 1 if summary.unhealthy is not None and not config.deploy_anyway else 0


if __name__ == "__main__":
    sys.exit(main())
