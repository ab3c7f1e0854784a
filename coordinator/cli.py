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
from fedprune.coordinator.aggregation import Rule
from fedprune.coordinator.config import Downlink, RunConfig, ScheduleConfig, UnitNorm
from fedprune.edge_client.quiet import native_log_filtered
from fedprune.protocol.errors import ConfigError, FedpruneError, print_error
from fedprune.protocol.options import add_broker_arguments, load_toml

PROG = "fedprune-coordinator"


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The run's options, shared by the coordinator and the demo."""
    d = RunConfig()
    s = d.schedule
    p.add_argument("--run", default=d.run, help="run name: topic root and run directory name")
    p.add_argument(
        "--model",
        default=d.model,
        help="preset (cnn, mlp) or path to a .keras/.h5 model (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds (default: %(default)s)")
    p.add_argument(
        "--schedule",
        choices=["polynomial", "constant", "mean"],
        default=s.kind.value,
        help="pruning schedule, in rounds (default: %(default)s)",
    )
    p.add_argument(
        "--target", type=float, default=s.target, help="target sparsity (default: %(default)s)"
    )
    p.add_argument(
        "--begin-round",
        type=int,
        default=s.begin_round,
        help="first round that prunes (default: %(default)s)",
    )
    p.add_argument(
        "--end-round",
        type=int,
        default=s.end_round,
        help="round at which the target is reached (default: %(default)s)",
    )
    p.add_argument(
        "--structure",
        default=s.structure,
        metavar="M:N",
        help="structured sparsity instead of the schedule: M zeros in every N consecutive weights "
        "(TF-MOT sparsity_m_by_n, e.g. 2:4), applied at --begin-round",
    )
    p.add_argument(
        "--units",
        choices=[norm.value for norm in UnitNorm if norm],
        default=s.units.value or None,
        help="structural pruning: remove whole Dense units and Conv2D filters of least L1 or L2 "
        "norm (--target is then the share of each layer's units) and rebuild the model smaller "
        "when the schedule is done; devices switch to it",
    )
    p.add_argument(
        "--rebuild-every",
        type=int,
        default=s.rebuild_every,
        metavar="N",
        help="with --units: rebuild the model every N rounds while pruning too (default: at the "
        "end only)",
    )
    p.add_argument(
        "--weight-target",
        type=float,
        default=s.weight_target,
        help="with --units (hybrid): then prune weights inside the remaining units to this "
        "sparsity, polynomially until --weight-end-round (default: off)",
    )
    p.add_argument(
        "--weight-end-round",
        type=int,
        default=s.weight_end_round,
        help="with --weight-target: the round it is reached (default: as many rounds after the "
        "units are done as they took)",
    )
    p.add_argument(
        "--local-epochs",
        type=int,
        default=d.local_epochs,
        help="epochs each client trains per round (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.learning_rate, help="(default: %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="(default: %(default)s)")
    p.add_argument(
        "--round-timeout",
        type=float,
        default=d.round_timeout,
        help="seconds a round waits for updates (default: %(default)s)",
    )
    p.add_argument(
        "--quorum",
        type=float,
        default=d.quorum,
        help="share of selected clients that closes a round early (default: %(default)s)",
    )
    p.add_argument(
        "--clients-per-round",
        type=int,
        default=d.clients_per_round,
        help="clients sampled per round, 0 = all online (default: %(default)s)",
    )
    p.add_argument(
        "--max-payload",
        type=int,
        default=d.max_payload,
        help="largest MQTT payload in bytes; bigger ones are chunked (default: %(default)s)",
    )
    p.add_argument(
        "--profile",
        default=d.profile,
        help="device profile of the final export (default: %(default)s)",
    )
    p.add_argument(
        "--signing-key",
        default=d.signing_key,
        metavar="FILE",
        help="sign everything the coordinator publishes with this Ed25519 key (with --device-keys)",
    )
    p.add_argument(
        "--device-keys",
        default=d.device_keys,
        metavar="DIR",
        help="folder of <device id>.pub verify keys; messages not signed by one of them are "
        "dropped, and unsigned devices refused (fedprune-provision writes both)",
    )
    p.add_argument(
        "--aggregation",
        choices=[rule.value for rule in Rule],
        default=d.aggregation.value,
        help="how updates are combined: fedavg (weighted by samples), or the robust median and "
        "trimmed-mean, which weigh every device the same (default: %(default)s)",
    )
    p.add_argument(
        "--clip-norm",
        type=float,
        default=d.clip_norm,
        help="scale any update with a larger L2 norm down to this norm (default: 0 = off)",
    )
    p.add_argument(
        "--staleness-weight",
        type=float,
        default=d.staleness_weight,
        metavar="W",
        help="count an update of the previous round that arrives late, during the next, with its "
        "samples times W (fedavg only; default: 0 = rejected as late)",
    )
    p.add_argument(
        "--codec",
        default=d.codec,
        metavar="CODEC",
        help="how devices send updates: auto (each by its profile's uplink), or one for all, "
        "such as f32, f16, int8, int8sr (stochastic rounding), int8+top0.1 (the largest 10%% "
        "of the kept values, with error feedback), int8+top0.1+zstd (default: %(default)s)",
    )
    p.add_argument(
        "--downlink",
        choices=[mode.value for mode in Downlink],
        default=d.downlink.value,
        help="delta: send each round's model as a change to the previous one (int8 unless "
        "--codec says f32 or f16) to the devices that hold it, whole to the others; codec: the "
        "change in the --codec given, top-k and zstd included (what it leaves out goes later); "
        "full: always whole (default: %(default)s)",
    )
    p.add_argument(
        "--trim",
        type=float,
        default=d.trim,
        help="trimmed-mean: share of the largest and of the smallest values dropped per weight "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-update-bytes",
        type=int,
        default=d.max_update_bytes,
        help="largest update a device may send (default: twice the dense float32 model)",
    )
    p.add_argument(
        "--max-norm",
        type=float,
        default=d.max_norm,
        help="largest L2 norm of an update (default: %(default)s)",
    )
    p.add_argument(
        "--max-samples",
        type=int,
        default=d.max_samples,
        help="most samples an update may claim; never more than the device's hello declared "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-pending-bytes",
        type=int,
        default=d.max_pending_bytes,
        help="memory for updates still in assembly, all devices together (default: %(default)s)",
    )
    p.add_argument(
        "--aggregators",
        type=int,
        default=d.aggregators,
        metavar="N",
        help="N fedprune-aggregator processes take the updates through an MQTT 5 shared "
        "subscription and send partial sums (fedavg; docs/scaling.md; default: 0 = none)",
    )
    p.add_argument("--out", default=d.out, help="folder of run directories (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run of the same name"
    )
    p.add_argument(
        "--deploy-anyway",
        action="store_true",
        help="deploy the final model even when it is not better than chance or ends far below "
        "its first evaluated round (such a run is otherwise exported but not deployed)",
    )
    p.add_argument(
        "--install-wait",
        type=float,
        default=d.install_wait,
        help="seconds devices get to confirm the deployed model before the run ends "
        "(default: %(default)s)",
    )
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


RENAMED = {"learning_rate": "lr", "kind": "schedule"}
"""The RunConfig fields (the schedule's among them) whose option has another name."""


def read_run_config(path: Path, p: argparse.ArgumentParser) -> dict[str, Any]:
    """A run's config.toml (what every run writes into its directory) as ``p``'s defaults.
    ``overwrite`` is not taken from it: replacing a run is asked for each time."""
    table = load_toml(path)
    schedule = table.pop("schedule", {})
    if not isinstance(schedule, dict):
        raise ConfigError(f"{path}: schedule must be a table")
    known = vars(p.parse_args([]))
    defaults = {}
    for key, value in [*table.items(), *schedule.items()]:
        dest = RENAMED.get(key, key)
        if dest not in known or dest in ("config", "resume"):
            raise ConfigError(f"{path}: unknown key {key!r}")
        wanted = type(known[dest]) if known[dest] is not None else str
        if not (type(value) is wanted or wanted is float and type(value) is int):
            raise ConfigError(f"{path}: {key} must be {wanted.__name__}, got {value!r}")
        if key != "overwrite":
            defaults[dest] = value
    return defaults


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
        p.set_defaults(**read_run_config(known.config, p))
    if known.resume is not None:
        run_dir = known.resume.resolve()
        p.set_defaults(**read_run_config(run_dir / "config.toml", p))
        p.set_defaults(run=run_dir.name, out=str(run_dir.parent))
        if (run_dir / "heldout.npz").is_file():  # the run's own copy, wherever it was started
            p.set_defaults(heldout=str(run_dir / "heldout.npz"))
    return p.parse_args(argv)


def config_from(args: argparse.Namespace, **overrides: object) -> RunConfig:
    """A validated ``RunConfig`` from the parsed options, with ``overrides`` on top."""
    schedule = ScheduleConfig(
        kind=args.schedule,  # a config file's may be any text: ScheduleConfig checks it
        target=args.target,
        begin_round=args.begin_round,
        end_round=args.end_round,
        structure=args.structure,
        units=UnitNorm(args.units or ""),
        rebuild_every=args.rebuild_every,
        weight_target=args.weight_target,
        weight_end_round=args.weight_end_round,
    )
    values: dict[str, object] = dict(
        run=args.run,
        model=args.model,
        rounds=args.rounds,
        schedule=schedule,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        momentum=args.momentum,
        round_timeout=args.round_timeout,
        quorum=args.quorum,
        clients_per_round=args.clients_per_round,
        max_payload=args.max_payload,
        profile=args.profile,
        out=args.out,
        seed=args.seed,
        overwrite=args.overwrite,
        deploy_anyway=args.deploy_anyway,
        install_wait=args.install_wait,
        signing_key=args.signing_key,
        device_keys=args.device_keys,
        aggregation=args.aggregation,
        clip_norm=args.clip_norm,
        staleness_weight=args.staleness_weight,
        codec=args.codec,
        downlink=args.downlink,
        trim=args.trim,
        max_update_bytes=args.max_update_bytes,
        max_norm=args.max_norm,
        max_samples=args.max_samples,
        max_pending_bytes=args.max_pending_bytes,
        aggregators=args.aggregators,
    )
    values.update(overrides)
    return RunConfig(**values)  # type: ignore[arg-type]  # checked in __post_init__


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
    p.add_argument(
        "--min-clients",
        type=int,
        default=3,
        help="clients that must join before round 1 (default: %(default)s)",
    )
    p.add_argument(
        "--join-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for them (default: %(default)s)",
    )
    p.add_argument(
        "--heldout",
        default="",
        help=".npz (x, y) the coordinator evaluates on and exports with (optional)",
    )
    add_run_arguments(p)
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
        config = config_from(
            args,
            broker=args.broker,
            ca=args.ca or "",
            cert=args.cert or "",
            key=args.key or "",
            credentials=args.credentials or "",
            min_clients=args.min_clients,
            join_timeout=args.join_timeout,
            heldout=args.heldout,
        )
        with native_log_filtered():
            from fedprune.coordinator import session
            from fedprune.coordinator.progress import round_line, summary_lines

        started = time.perf_counter()
        with monitoring(args, config) as extra:
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
