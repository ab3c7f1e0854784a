"""``fedprune-coordinator``: serve a federated pruning run against an MQTT broker."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedprune import __version__, device_profiles
from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.observer import Reminding
from fedprune.coordinator.options import add_run_arguments, config_from, read_run_config
from fedprune.edge_client.quiet import native_log_filtered
from fedprune.protocol.connection import Reminder, check_exposure
from fedprune.protocol.errors import ConfigError, FedpruneError, print_error
from fedprune.protocol.options import add_broker_arguments, add_insecure_argument

PROG = "fedprune-coordinator"

log = logging.getLogger("fedprune.coordinator")


def add_monitoring_arguments(p: argparse.ArgumentParser) -> None:
    """The live views of a run, shared by the coordinator and the demo."""
    watch = p.add_argument_group(
        "monitoring",
        "Addresses are PORT or :PORT (loopback only) or HOST:PORT (0.0.0.0:PORT: every "
        "interface). fedprune-monitor shows the same from any machine that reaches the broker.",
    )
    watch.add_argument(
        "--dashboard", metavar="[HOST:]PORT", help="serve the live web dashboard of this run"
    )
    watch.add_argument(
        "--metrics-port",
        metavar="[HOST:]PORT",
        help="expose Prometheus metrics on http://HOST:PORT/metrics",
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Flags over the ``--config`` file (or the resumed run's config.toml) over the defaults."""
    p = parser()
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", type=Path)
    early.add_argument("--resume", type=Path)
    known = early.parse_known_args(argv)[0]
    if known.config is not None and known.resume is not None:
        p.error("--config and --resume exclude each other (a resumed run keeps its config)")
    if known.config is not None:
        p.set_defaults(**read_run_config(known.config))
    if known.resume is not None:
        run_dir = known.resume.resolve()
        p.set_defaults(**read_run_config(run_dir / "config.toml"))
        p.set_defaults(run=run_dir.name, out=str(run_dir.parent))
        if (run_dir / "heldout.npz").is_file():  # the run's own copy, wherever it was started
            p.set_defaults(heldout=str(run_dir / "heldout.npz"))
    return p.parse_args(argv)


@contextlib.contextmanager
def monitoring(args: argparse.Namespace, config: RunConfig) -> Iterator[dict[str, Any]]:
    """The dashboard and the metrics endpoint that ``args`` ask for, as ``session.run``'s
    keyword arguments, served while the run lasts."""
    from fedprune.monitor.dashboard import Dashboard, parse_address

    extra: dict[str, Any] = {"observers": [], "listeners": []}
    with contextlib.ExitStack() as stack:
        if args.metrics_port:
            from fedprune.coordinator.prometheus import Metrics

            metrics = Metrics(config.run, rounds=config.rounds)
            host, port = parse_address(args.metrics_port)
            port = metrics.serve((host, port))
            stack.callback(metrics.close)
            print(f"Prometheus metrics at http://{host}:{port}/metrics", flush=True)
            extra["observers"].append(metrics)
        if args.dashboard:
            dashboard = Dashboard(parse_address(args.dashboard)).start()
            stack.callback(dashboard.close)
            print(f"dashboard at {dashboard.url}", flush=True)
            extra["listeners"].append(dashboard.show)
        yield extra


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Coordinate a federated training run with TF-MOT pruning over MQTT: publish "
        "the pruned global model each round, aggregate the clients' sparse updates with FedAvg, "
        "prune on schedule, and export the final model to TFLite.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="start a run with the settings of this TOML file, written like the config.toml of "
        "every run directory (flags override it)",
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (e.g. runs/NAME) from its last checkpoint, with the "
        "config it was started with (flags override it); its devices rejoin by themselves",
    )
    add_broker_arguments(p)
    add_insecure_argument(p)
    add_run_arguments(p)
    add_monitoring_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except ConfigError as exc:
        return print_error(PROG, exc)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # TensorFlow's own INFO lines ("Assets written to: /tmp/...") say nothing to an operator.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    try:
        device_profiles.load(args.profile)
        config = config_from(args)
        exposed = check_exposure(
            config.broker_settings(), signed=bool(config.signing_key), insecure=args.insecure
        )
        with native_log_filtered():
            from fedprune.coordinator import session
            from fedprune.coordinator.progress import round_line, summary_lines

        started = time.perf_counter()
        with monitoring(args, config) as extra:
            if exposed:
                extra["observers"].append(Reminding(Reminder(log, exposed)))
            summary = session.run(
                config,
                on_round=lambda r: print(round_line(r), flush=True),
                resume=args.resume is not None,
                **extra,
            )
    except (FedpruneError, device_profiles.ProfileError, OSError) as exc:
        return print_error(PROG, exc)
    except KeyboardInterrupt:
        return 130
    for line in summary_lines(summary, seconds=time.perf_counter() - started):
        print(line)
    return 1 if summary.unhealthy is not None and not config.deploy_anyway else 0


if __name__ == "__main__":
    sys.exit(main())
