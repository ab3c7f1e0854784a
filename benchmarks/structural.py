"""Structural against weight pruning: accuracy, size, LiteRT latency and training step, uplink.

    .venv/bin/python benchmarks/structural.py [--models cnn,wide] [--seeds 0] [--rounds 20]
        [--clients 5] [--configs dense,...] [--results benchmarks/results/structural.json]

Each configuration is one ``fedprune-demo`` run (``--clients`` device processes on non-IID
digits, alpha 0.5, the same rounds and learning settings, updates in float32 so that the bytes
show the pruning alone) against a mosquitto started here. Two models: the ``cnn`` preset and
``wide``, a larger CNN written to a .keras file here (Conv32, Conv64, pooling, Dense256; 284k
parameters), which the run takes as a user's model. Pruning ramps from round 0 to half the rounds
(hybrid: units by a third of the rounds, then weights inside them by two thirds).

Then every run's final model is measured in this one process, one model after the other: its
.tflite file per precision (raw and gzip -9, through ``converters.export_model``, dense format,
accuracy on the held-out digits) with LiteRT's median single-image latency on one thread, and the
median batch-32 ``train`` step of its litert training artifact. Ratios to dense are of numbers
measured in this same process. Prints Markdown tables (medians over seeds); ``--results`` keeps
the raw numbers as JSON (``--report-only`` prints the tables again from it).

``--keep DIR`` keeps the float32 and dynamic int8 .tflite files of the first seed there, and
``--arm64 DIR`` times every .tflite in DIR on one thread in the emulated 64-bit ARM userland
(``scripts/arm64.sh``: qemu-user, a Cortex-A72 by default) and prints each as a ratio to the dense
model of the same precision: emulation is not a Pi's speed, the ratios are what it shows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_keras  # noqa: E402
from ai_edge_litert.interpreter import OpResolverType  # noqa: E402

from fedprune.converters.export import export_model, load_run_model  # noqa: E402
from fedprune.converters.task import task_of  # noqa: E402
from fedprune.converters.trainable import build_trainable  # noqa: E402
from fedprune.coordinator.broker import EmbeddedBroker  # noqa: E402
from fedprune.device_profiles import Precision  # noqa: E402
from fedprune.edge_client import data as npz_data  # noqa: E402
from fedprune.edge_client.quiet import native_log_filtered  # noqa: E402
from fedprune.edge_client.task import Task  # noqa: E402
from fedprune.protocol.errors import ExportError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from export_variants import variant_profile  # noqa: E402
from trainable import step_ms  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from processes import demo  # noqa: E402 - the test suite's commands

PROFILE = "raspberry-pi-4"
CONFIGS: dict[str, list[str]] = {
    "dense": ["--target", "0"],
    "weights 80%": ["--target", "0.8"],
    "weights 90%": ["--target", "0.9"],
    "units 50%": ["--units", "l2", "--target", "0.5"],
    "units 62.5%": ["--units", "l2", "--target", "0.625"],
    "units 75%": ["--units", "l2", "--target", "0.75"],
    "units 87.5%": ["--units", "l2", "--target", "0.875"],
    "hybrid units 50% + weights 80%": [
        "--units",
        "l2",
        "--target",
        "0.5",
        "--weight-target",
        "0.8",
    ],
}


def wide() -> tf_keras.Model:
    """The larger model: Conv32 -> Conv64 -> max pool -> Dense256 -> 10 (283,786 parameters)."""
    layers = tf_keras.layers
    tf_keras.utils.set_random_seed(0)
    return tf_keras.Sequential(
        [
            layers.Input((8, 8, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ],
        name="wide",
    )


def one_run(
    url: str,
    out: Path,
    model: str,
    *,
    config: str,
    seed: int,
    rounds: int,
    clients: int,
    flags: list[str] | None = None,
    profile: str = PROFILE,
) -> Path:
    """Train one configuration (``flags``: its demo flags, by default ``CONFIGS[config]``, on
    ``profile`` devices); its run directory."""
    flags = CONFIGS[config] if flags is None else flags
    slug = re.sub(r"[^a-z0-9]+", "-", config).strip("-")
    run = f"struct-{Path(model).stem}-{slug}-{seed}"
    hybrid = "--weight-target" in flags
    end = rounds // 3 if hybrid else rounds // 2
    done = subprocess.run(
        demo(
            url,
            *flags,
            out=out,
            run=run,
            model=model,
            clients=clients,
            alpha=0.5,
            seed=seed,
            rounds=rounds,
            begin_round=0,
            end_round=end,
            codec="f32",
            downlink="full",
            client_profiles=profile,
            deploy_anyway=True,
            install_wait=0,
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"run {run} failed:\n{done.stderr[-3000:]}")
    return out / run


def measure(run_dir: Path, steps: int, keep: Path | None = None) -> dict[str, Any]:
    """The run's final model: its score, parameters, uplink, exports, latency, training step.

    ``metric`` says what ``accuracy`` (the coordinator's last held-out score) and each export's
    ``accuracy`` (its LiteRT score) are: a classifier's accuracy, or a reconstruction's ROC AUC
    (its ``loss`` and each export's ``mse`` are then the mean squared error). An export that
    ``export_model`` refuses is recorded as ``{"refused": reason}``."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model = load_run_model(run_dir)
    task = task_of(model)
    heldout = npz_data.load(run_dir / "heldout.npz", holdout=0.0)
    exports: dict[str, dict[str, Any]] = {}
    for precision in Precision:
        profile = variant_profile(precision, sparse=False)
        try:
            with native_log_filtered():
                report = export_model(
                    model,
                    profile,
                    x=heldout.x,
                    y=heldout.y,
                    out_dir=run_dir / "bench" / profile.name,
                )
        except ExportError as refused:
            exports[precision.value] = {"refused": str(refused)}
            print(f"{run_dir.name} {precision.value}: refused: {refused}", file=sys.stderr)
            continue
        if keep is not None and precision in (Precision.FLOAT32, Precision.DYNAMIC_INT8):
            keep.mkdir(parents=True, exist_ok=True)
            name = f"{run_dir.name.removeprefix('struct-')}--{precision.value}.tflite"
            (keep / name).write_bytes(report.model_path.read_bytes())
        exports[precision.value] = {
            "bytes": report.tflite_bytes,
            "gzip": report.gzip_bytes,
            "accuracy": report.tflite_score,
            "latency_ms": report.latency_ms_p50,
        }
        if task is Task.RECONSTRUCT:
            exports[precision.value]["mse"] = report.tflite_mse
    with native_log_filtered():
        artifact = build_trainable(
            model, batch_size=32, optimizer="sgd", learning_rate=0.05, momentum=0.9, task=task
        )
    last = metrics[-1]
    scores: dict[str, Any] = (
        {"metric": "accuracy", "accuracy": last["accuracy"]}
        if task is Task.CLASSIFY
        else {"metric": "AUC", "accuracy": last["auc"], "loss": last["loss"]}
    )
    return {
        **scores,
        "parameters": int(model.count_params()),
        "sparsity": last["sparsity"],
        "up_per_round": last["bytes_up"] / max(1, last["reported"]),
        "exports": exports,
        "train_step_ms": step_ms(artifact, OpResolverType.AUTO, steps),
    }


ARM_TIMER = """
import json, sys
from pathlib import Path
import numpy as np
from fedprune.edge_client.litert import load_interpreter, measure_latency
out = {}
for path in sorted(Path(sys.argv[1]).glob("*.tflite")):
    interpreter = load_interpreter(path, num_threads=1)
    sample = np.random.default_rng(0).random((8, 8, 1), dtype=np.float32)
    out[path.stem] = measure_latency(interpreter, sample).p50_ms
    print(path.stem, out[path.stem], file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def arm64(folder: Path) -> None:
    """Time the kept .tflite files in the emulated ARM userland; ratios to dense."""
    script = folder / "time_arm64.py"
    script.write_text(ARM_TIMER)
    done = subprocess.run(
        [
            str(Path(__file__).parents[1] / "scripts" / "arm64.sh"),
            "python",
            str(script),
            str(folder),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the arm64 timing failed:\n{done.stderr[-3000:]}")
    latency = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n| model, config | precision | latency ms (emulated arm64, 1 thread) | x faster |")
    print("|---|---|---|---|")
    for stem, ms in latency.items():
        run, precision = stem.split("--")
        model, seed = run.split("-")[0], run.rsplit("-", 1)[1]
        dense = latency[f"{model}-dense-{seed}--{precision}"]
        print(f"| {run} | {precision} | {ms:.3f} | {dense / ms:.1f}x |")


def report(rows: list[dict[str, Any]]) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]

        def med(config: str, get: Any, group: list[dict[str, Any]] = group) -> float:
            return statistics.median(get(r) for r in group if r["config"] == config)

        seeds = len({r["seed"] for r in group})
        dense_acc = med("dense", lambda r: r["accuracy"])
        dense_lat = med("dense", lambda r: r["exports"]["float32"]["latency_ms"])
        dense_step = med("dense", lambda r: r["train_step_ms"])
        dense_gzip = med("dense", lambda r: r["exports"]["float32"]["gzip"])
        dense_up = med("dense", lambda r: r["up_per_round"])
        print(f"\n#### {model}: medians of {seeds} seed(s)\n")
        print(
            "| config | accuracy | vs dense | parameters | up/round | x dense | float32 latency"
            " ms | x faster | train step ms | x faster | float32 gzip | int8 gzip | x smaller"
            " (int8 gzip vs f32 dense) |"
        )
        print("|---" * 13 + "|")
        for config in CONFIGS:
            if not any(r["config"] == config for r in group):
                continue
            acc = med(config, lambda r: r["accuracy"])
            lat = med(config, lambda r: r["exports"]["float32"]["latency_ms"])
            step = med(config, lambda r: r["train_step_ms"])
            up = med(config, lambda r: r["up_per_round"])
            int8 = med(config, lambda r: r["exports"]["dynamic_int8"]["gzip"])
            print(
                f"| {config} | {acc:.3f} | {(acc - dense_acc) * 100:+.1f} pt"
                f" | {med(config, lambda r: r['parameters']):,.0f} | {up:,.0f}"
                f" | {dense_up / up:.1f}x | {lat:.4f} | {dense_lat / lat:.1f}x | {step:.3f}"
                f" | {dense_step / step:.1f}x"
                f" | {med(config, lambda r: r['exports']['float32']['gzip']):,.0f}"
                f" | {int8:,.0f} | {dense_gzip / int8:.1f}x |"
            )
        print(f"\n.tflite bytes (raw / gzip) and LiteRT accuracy per precision, {model}:\n")
        print("| config | " + " | ".join(p.value for p in Precision) + " |")
        print("|---" * (len(Precision) + 1) + "|")
        for config in CONFIGS:
            if not any(r["config"] == config for r in group):
                continue
            cells = []
            for p in Precision:
                raw = med(config, lambda r, p=p: r["exports"][p.value]["bytes"])
                packed = med(config, lambda r, p=p: r["exports"][p.value]["gzip"])
                acc = med(config, lambda r, p=p: r["exports"][p.value]["accuracy"])
                cells.append(f"{raw:,.0f} / {packed:,.0f} ({acc:.3f})")
            print(f"| {config} | " + " | ".join(cells) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="cnn,wide")
    p.add_argument("--seeds", default="0")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=100, help="timed training steps per model")
    p.add_argument("--results", type=Path, default=None, help="keep the raw numbers here (JSON)")
    p.add_argument("--report-only", action="store_true", help="only report --results again")
    p.add_argument("--keep", type=Path, default=None, help="keep the first seed's .tflite here")
    p.add_argument(
        "--arm64",
        type=Path,
        default=None,
        metavar="DIR",
        help="only time DIR's .tflite files on emulated arm64",
    )
    args = p.parse_args()
    if args.arm64 is not None:
        arm64(args.arm64.resolve())
        return 0
    if args.report_only:
        report(json.loads(args.results.read_text()))
        return 0
    configs = args.configs.split(",")
    if unknown := [c for c in configs if c not in CONFIGS]:
        p.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker("mosquitto") as broker:
        wide_path = Path(tmp) / "wide.keras"
        wide().save(wide_path)
        trained = []
        for model in args.models.split(","):
            source = str(wide_path) if model == "wide" else model
            for seed in (int(s) for s in args.seeds.split(",")):
                for config in configs:
                    started = time.perf_counter()
                    run_dir = one_run(
                        broker.url,
                        Path(tmp),
                        source,
                        config=config,
                        seed=seed,
                        rounds=args.rounds,
                        clients=args.clients,
                    )
                    trained.append((model, seed, config, run_dir))
                    print(
                        f"{model} seed {seed} {config}: trained in"
                        f" {time.perf_counter() - started:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        for model, seed, config, run_dir in trained:  # measured together, one after the other
            first = seed == int(args.seeds.split(",")[0])
            rows.append(
                {
                    "model": model,
                    "seed": seed,
                    "config": config,
                    **measure(run_dir, args.steps, args.keep if first else None),
                }
            )
            print(f"{model} seed {seed} {config}: measured", file=sys.stderr, flush=True)
            if args.results is not None:
                args.results.write_text(json.dumps(rows, indent=1))
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
