"""``fedprune-monitor``: watch a run from any machine that reaches the broker.

It reads what the coordinator keeps retained on the broker (the ``telemetry`` snapshot and the
coordinator's status) and shows it: a live terminal view, one JSON snapshot for scripts
(``--once --json``), or the web dashboard (``--web``). It needs the light install only (no
TensorFlow, no LiteRT) and only reads, so a broker's read-only monitor account is enough.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fedprune import __version__
from fedprune.monitor.watcher import Watcher
from fedprune.protocol.envelope import UNSIGNED
from fedprune.protocol.errors import (
    ConfigError,
    FedpruneError,
    print_error,
)
from fedprune.protocol.messages import COORDINATOR
from fedprune.protocol.options import (
    add_broker_arguments,
    add_config_argument,
    broker_settings,
    name,
    parse_with_config,
)
from fedprune.protocol.signing import Trust, load_verify_key
from fedprune.protocol.transport import MqttTransport

PROG = "fedprune-monitor"
log = logging.getLogger("fedprune.monitor")

CONFIG_KEYS = {  # a monitor's config file (fedprune-provision writes monitor/monitor.toml)
    "broker": ("broker", False),
    "ca": ("ca", True),
    "cert": ("cert", True),
    "key": ("key", True),
    "credentials": ("credentials", True),
    "run": ("run", False),
    "coordinator_key": ("coordinator_key", True),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Watch a fedprune run live: the run, the round in progress, the last rounds "
        "and every device, from what the coordinator keeps on the broker. Needs only the light "
        "install and read access to the run's topics.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_config_argument(p, CONFIG_KEYS)
    add_broker_arguments(p)
    p.add_argument("--run", type=name, default="default", help="run name (default: %(default)s)")
    p.add_argument(
        "--coordinator-key",
        metavar="FILE",
        help="the coordinator's verify key: snapshots it did not sign are dropped",
    )
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    p.add_argument(
        "--svg", type=Path, metavar="FILE", help="with --once: also save the view as SVG"
    )
    p.add_argument(
        "--web",
        metavar="[HOST:]PORT",
        help="serve the web dashboard instead (PORT or :PORT listen on loopback only; "
        "0.0.0.0:PORT on every interface)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=10.0,
        help="seconds to wait for the run's telemetry before giving up (default: %(default)s)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = parse_with_config(p, argv, CONFIG_KEYS)
    if (args.json or args.svg) and not args.once:
        p.error("--json and --svg go with --once")
    if args.web and args.once:
        p.error("--web serves until stopped; it does not go with --once")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except ConfigError as exc:
        return print_error(PROG, exc)
    logging.basicConfig(
        level=logging.WARNING if args.quiet or not args.web else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    transport: MqttTransport | None = None
    try:
        trust = UNSIGNED
        if args.coordinator_key:
            trust = Trust.of({COORDINATOR: load_verify_key(args.coordinator_key)})
        transport = MqttTransport(
            broker_settings(args),
            client_id=f"{PROG}-{os.getpid()}",
            connect_attempts=2 if args.once else 5,
        )
        watcher = Watcher(transport, args.run, trust=trust)
        watcher.wait(args.wait)
        if args.once:
            return _once(watcher, args)
        if args.web:
            return _serve(watcher, args.web)
        return _live(watcher)
    except FedpruneError as exc:
        return print_error(PROG, exc)
    except OSError as exc:
        return print_error(PROG, exc)
    except KeyboardInterrupt:
        return 0
    finally:
        if transport is not None:
            transport.close()


def _once(watcher: Watcher, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(watcher.as_json(), indent=2))
    else:
        from fedprune.monitor.view import console, render

        out = console(record=args.svg is not None)
        assert watcher.snapshot is not None
        out.print(render(watcher.snapshot, watcher.coordinator, width=out.width))
        if args.svg is not None:
            out.save_svg(str(args.svg), title=f"{PROG} --run {watcher.topics.run}")
    return 0


def _serve(watcher: Watcher, address: str) -> int:
    from fedprune.monitor.dashboard import Dashboard, parse_address

    dashboard = Dashboard(parse_address(address)).start()
    print(f"{PROG}: dashboard of run {watcher.topics.run} at {dashboard.url}", flush=True)
    try:
        while True:
            if watcher.snapshot is not None:
                dashboard.show(watcher.snapshot, watcher.coordinator)
            while not watcher.poll(1.0):
                pass
    finally:
        dashboard.close()


def _live(watcher: Watcher) -> int:
    """A live view on a terminal; elsewhere (a pipe, a log) one line per round or phase."""
    from fedprune.monitor.view import console, line, render

    out = console()
    if not out.is_terminal:
        said = ""
        while True:
            assert watcher.snapshot is not None
            text = line(watcher.snapshot, watcher.coordinator)
            if text != said:
                print(text, flush=True)
                said = text
            watcher.poll(1.0)
    from rich.live import Live

    assert watcher.snapshot is not None
    with Live(
        render(watcher.snapshot, watcher.coordinator, width=out.width),
        console=out,
        refresh_per_second=4,
        screen=False,
    ) as live:
        while True:
            if watcher.poll(1.0) and watcher.snapshot is not None:
                live.update(render(watcher.snapshot, watcher.coordinator, width=out.width))


if __name__ == "__main__":
    sys.exit(main())
