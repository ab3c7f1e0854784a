"""Bytes on the wire per update codec, against dense float32 FedAvg, through a real mosquitto.

    .venv/bin/python benchmarks/communication.py [--models mlp,cnn] [--alphas 0.5,0.1]
        [--seeds 0,1,2] [--rounds 20] [--clients 10] [--configs dense,f32,...] [--results FILE]
        [--plot docs/images/communication.png]

Each configuration is one ``fedprune-demo`` run (10 device processes on non-IID digits, the same
rounds and learning settings) against a mosquitto started here, with an independent subscriber
that counts every update byte the broker delivers. Per run it records the coordinator's byte
counts (metrics.jsonl, summary.json), the subscriber's, the devices' own received bytes, the
accuracy after every round and the devices' training time. Encode and decode times are measured
here on updates of each model's size, with the run's codec. Prints Markdown tables (medians over
seeds) and writes a PNG of accuracy against cumulative uplink bytes. ``--results`` keeps the raw
runs as JSON: runs already in it are not done again (``--report-only`` prints the tables and
plot again from it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.coordinator.broker import EmbeddedBroker
from fedprune.device_profiles import load as load_profile
from fedprune.protocol.codec import Codec, Model, Update, decode_update, encode_update
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from processes import demo  # the test suite's commands

# name -> (target sparsity, update codec, downlink)
CONFIGS: dict[str, tuple[float, str, str]] = {
    "dense": (0.0, "f32", "full"),  # dense float32 FedAvg without pruning: the baseline
    "f32": (0.8, "f32", "full"),  # pruned, float32 at the kept positions (before issue 12)
    "f16": (0.8, "f16", "delta"),
    "int8": (0.8, "int8", "delta"),
    "int8sr": (0.8, "int8sr", "delta"),
    "top0.1": (0.8, "f32+top0.1", "delta"),
    "int8+top0.1": (0.8, "int8+top0.1", "delta"),
    "int8+top0.1+zstd": (0.8, "int8+top0.1+zstd", "delta"),
    "int8+top0.05+zstd": (0.8, "int8+top0.05+zstd", "delta"),
    "unpruned int8+top0.1+zstd": (0.0, "int8+top0.1+zstd", "delta"),  # the codecs alone
    "unpruned int8+top0.05+zstd": (0.0, "int8+top0.05+zstd", "delta"),
    # the model changes in the same codec (--downlink codec)
    "int8+top0.05+zstd both ways": (0.8, "int8+top0.05+zstd", "codec"),
    "unpruned int8+top0.05+zstd both ways": (0.0, "int8+top0.05+zstd", "codec"),
    "unpruned int8+top0.1+zstd both ways": (0.0, "int8+top0.1+zstd", "codec"),
    "unpruned int8+top0.07+zstd both ways": (0.0, "int8+top0.07+zstd", "codec"),
}
PROFILE = "raspberry-pi-4"  # every device: the same trainer and limits in every configuration
SLOW_PROFILE = "raspberry-pi-zero-2w"  # whose uplink the time-to-accuracy column simulates


def one_run(
    url: str,
    out: Path,
    *,
    model: str,
    alpha: float,
    seed: int,
    rounds: int,
    clients: int,
    config: str,
) -> dict[str, Any]:
    target, codec, downlink = CONFIGS[config]
    slug = re.sub(r"[^a-z0-9]+", "-", config)
    run = f"comm-{model}-{slug}-{alpha}-{seed}".replace(".", "_")
    counter = MqttTransport(url, client_id=f"counter-{time.time_ns()}")
    counter.subscribe(Topics(run).all_updates)
    started = time.perf_counter()
    done = subprocess.run(
        demo(
            url,
            out=out,
            run=run,
            model=model,
            clients=clients,
            alpha=alpha,
            seed=seed,
            rounds=rounds,
            target=target,
            begin_round=0,
            end_round=rounds // 2,
            codec=codec,
            downlink=downlink,
            client_profiles=PROFILE,
            deploy_anyway=True,
            install_wait=0,
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    counted = 0
    while (item := counter.get(timeout=0.5)) is not None:
        counted += len(item[1])
    counter.close()
    if done.returncode != 0:
        raise SystemExit(f"run {run} failed:\n{done.stderr[-3000:]}")
    run_dir = out / run
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    devices = json.loads((run_dir / "devices.json").read_text())["devices"]
    received = sum(
        int(re.search(r"(\d+) bytes received", p.read_text())[1])  # type: ignore[index]
        for p in (run_dir / "logs").glob("client-*.log")
    )
    return {
        "model": model,
        "alpha": alpha,
        "seed": seed,
        "config": config,
        "codec": codec,
        "wall_seconds": seconds,
        "accuracy": [r["accuracy"] for r in metrics],
        "bytes_up": [r["bytes_up"] for r in metrics],
        "bytes_down": [r["bytes_down"] for r in metrics],
        "dense_bytes_up": [r["dense_bytes_up"] for r in metrics],
        "dense_bytes_down": [r["dense_bytes_down"] for r in metrics],
        "reported": [r["reported"] for r in metrics],
        "subscriber_bytes_up": counted,
        "summary_bytes_down": json.loads((run_dir / "summary.json").read_text())["bytes_down"],
        "devices_bytes_received": received,
        "train_seconds": statistics.median(
            d["train_seconds"] for d in devices if d.get("train_seconds")
        ),
        "sparsity": metrics[-1]["sparsity"],
    }


def codec_seconds(model: str, codec: str, repeats: int = 20) -> tuple[float, float]:
    """Median encode and decode seconds of one update of ``model``'s size at 80% sparsity."""
    from fedprune.coordinator import models

    weights = [np.asarray(w, np.float32) for w in models.build(model).get_weights()]
    rng = np.random.default_rng(0)
    masks: list[np.ndarray | None] = [
        (rng.random(w.shape) < 0.2).astype(np.float32) if w.ndim > 1 else None for w in weights
    ]
    shape = Model(weights=weights, masks=masks)
    deltas = [
        (rng.standard_normal(w.shape) * 0.01).astype(np.float32) * (1 if m is None else m)
        for w, m in zip(weights, masks, strict=True)
    ]
    update = Update(round=1, num_samples=100, deltas=deltas)
    chosen = Codec.parse(codec)
    encode, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        payload = encode_update(update, masks, chosen)
        t1 = time.perf_counter()
        decode_update(payload, shape)
        encode.append(t1 - t0)
        decode.append(time.perf_counter() - t1)
    return statistics.median(encode), statistics.median(decode)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def to_target(run: dict[str, Any], target: float) -> tuple[float, float]:
    """Uplink bytes and simulated seconds (training, then each device's update over the slow
    profile's uplink) until the accuracy first reaches ``target``; NaN if it never does."""
    kbps = load_profile(SLOW_PROFILE).uplink_kbps
    up = seconds = 0.0
    for accuracy, sent, reported in zip(
        run["accuracy"], run["bytes_up"], run["reported"], strict=True
    ):
        up += sent
        per_device = sent / max(1, reported)
        seconds += run["train_seconds"] + per_device * 8 / (kbps * 1000)
        if accuracy is not None and accuracy >= target:
            return up, seconds
    return math.nan, math.nan


def report(runs: list[dict[str, Any]], plot: Path | None) -> None:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["model"], run["alpha"]), []).append(run)
    for (model, alpha), group in groups.items():
        dense = [r for r in group if r["config"] == "dense"]
        target = 0.95 * _median([r["accuracy"][-1] for r in dense])
        dense_up_run = _median([sum(r["dense_bytes_up"]) for r in dense])
        seeds = len({r["seed"] for r in group})
        print(f"\n### {model}, alpha {alpha}: medians of {seeds} seed(s)\n")
        print(
            f"Target for the last columns: 95% of dense FedAvg's final accuracy = {target:.3f}.\n"
        )
        print(
            "| config | final acc. | up/round (last) | x dense | up/run | x dense | "
            "down/round (last) | x dense | up to target | x dense | time to target "
            f"({SLOW_PROFILE}) | encode ms | decode ms | train ms | counts equal |"
        )
        print("|---" * 15 + "|")
        base = {}
        for config in CONFIGS:
            these = [r for r in group if r["config"] == config]
            if not these:
                continue
            last_up = _median([r["bytes_up"][-1] / r["reported"][-1] for r in these])
            dense_last = _median([r["dense_bytes_up"][-1] / r["reported"][-1] for r in these])
            run_up = _median([sum(r["bytes_up"]) for r in these])
            last_down = _median([r["bytes_down"][-1] for r in these])
            dense_down = _median([r["dense_bytes_down"][-1] for r in these])
            reach = [to_target(r, target) for r in these]
            up_target = _median([b for b, _ in reach if not math.isnan(b)])
            time_target = _median([s for _, s in reach if not math.isnan(s)])
            if config == "dense":
                base = {"up": up_target, "time": time_target}
            reached = sum(not math.isnan(b) for b, _ in reach)
            encode, decode = codec_seconds(model, these[0]["codec"])
            equal = all(
                r["subscriber_bytes_up"] == sum(r["bytes_up"])
                and r["devices_bytes_received"] == r["summary_bytes_down"]
                for r in these
            )
            print(
                f"| {config} | {_median([r['accuracy'][-1] for r in these]):.3f}"
                f" | {last_up:,.0f} | {dense_last / last_up:.1f}x"
                f" | {run_up:,.0f} | {dense_up_run / run_up:.1f}x"
                f" | {last_down:,.0f} | {dense_down / last_down:.1f}x"
                f" | {up_target:,.0f} ({reached}/{len(these)}) | {base['up'] / up_target:.1f}x"
                f" | {time_target:.1f} s | {encode * 1e3:.2f} | {decode * 1e3:.2f}"
                f" | {_median([r['train_seconds'] for r in these]) * 1e3:.0f} | {equal} |"
            )
    if plot is not None:
        _plot(runs, plot)


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs})
    alphas = sorted({r["alpha"] for r in runs}, reverse=True)
    fig, axes = plt.subplots(
        len(models), len(alphas), figsize=(7 * len(alphas), 4.8 * len(models)), squeeze=False
    )
    panels = [
        (ax, m, a)
        for row, m in zip(axes, models, strict=True)
        for ax, a in zip(row, alphas, strict=True)
    ]
    colors = plt.get_cmap("tab20").colors
    for ax, model, alpha in panels:
        ax.set_prop_cycle(color=colors[::2] + colors[1::2])  # type: ignore[operator]
        for config in CONFIGS:
            these = [
                r for r in runs if (r["model"], r["alpha"], r["config"]) == (model, alpha, config)
            ]
            if not these:
                continue
            first = min(these, key=lambda r: r["seed"])
            style = {"color": "black", "linewidth": 2.0} if config == "dense" else {}
            ax.plot(
                np.cumsum(first["bytes_up"]), first["accuracy"], marker=".", label=config, **style
            )  # type: ignore[arg-type]
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bytes (all devices)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{model}, alpha {alpha} (seed {min(r['seed'] for r in runs)})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--alphas", default="0.5,0.1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--results", type=Path, default=None, help="keep the raw runs here (JSON)")
    p.add_argument("--report-only", action="store_true", help="only report --results again")
    p.add_argument("--plot", type=Path, default=None, help="write the PNG here")
    args = p.parse_args()
    if args.report_only:
        report(json.loads(args.results.read_text()), args.plot)
        return 0
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    runs: list[dict[str, Any]] = []  # with --results, the runs already there are kept, not redone
    if args.results is not None and args.results.is_file():
        runs = json.loads(args.results.read_text())
    done = {(r["model"], r["alpha"], r["seed"], r["config"]) for r in runs}
    grid = itertools.product(
        args.models.split(","),
        [float(a) for a in args.alphas.split(",")],
        [int(s) for s in args.seeds.split(",")],
        configs,
    )
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker("mosquitto") as broker:
        for model, alpha, seed, config in grid:
            if (model, alpha, seed, config) in done:
                continue
            run = one_run(
                broker.url,
                Path(tmp),
                model=model,
                alpha=alpha,
                seed=seed,
                rounds=args.rounds,
                clients=args.clients,
                config=config,
            )
            runs.append(run)
            print(
                f"{model} alpha {alpha} seed {seed} {config}: accuracy {run['accuracy'][-1]:.3f},"
                f" {sum(run['bytes_up']):,} bytes up, {run['wall_seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            if args.results is not None:
                args.results.write_text(json.dumps(runs))
    report(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
