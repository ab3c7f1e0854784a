"""The MLPerf Tiny reference models on devices without TensorFlow: accuracy, pruning, speed, size.

    .venv/bin/python benchmarks/edge_models.py [--models resnet8,dscnn,mobilenet,autoencoder]
        [--seeds 0,1,2] [--rounds 20] [--clients 5] [--results benchmarks/results/edge_models.json]
        [--keep DIR] [--arm64 DIR] [--report-only JSON...]

Per model and seed, one ``fedprune-demo`` run per configuration against a mosquitto started here
(``--clients`` device processes on non-IID digits, alpha 0.5, as benchmarks/structural.py runs
them): ``keras devices`` (the generic-x86-64 profile: tf_keras trains, dense) and, on
raspberry-pi-4 devices (the litert trainer, no TensorFlow), ``dense``, ``weights 80%``,
``units 50%`` (unit pruning: whole groups of coupled channels, the model rebuilt smaller) and
``hybrid`` (units 50%, then weights 80% inside them). Every final model is then measured in this
one process (``structural.measure``): held-out accuracy, each precision's .tflite (bytes, gzip,
LiteRT accuracy and single-image latency on one thread in the default interpreter) and the
litert training artifact's batch-32 step.

``autoencoder`` (MLPerf Tiny's fully connected autoencoder, a reconstruction) is scored by ROC AUC
instead of accuracy: the demo gives its devices the digits 0-4 only and labels the held-out digits
5-9 anomalies, and the AUC is that of the reconstruction error as the anomaly score (the tables
say so, and each row's ``metric`` in ``--results``). Its runs add ``MODEL_FLAGS`` (Adam, lr 0.01:
SGD with momentum barely learns it in 20 rounds). An export that ``export_model`` refuses is
recorded with its reason and shown as ``refused``.

Then, per model, the device's training step against tf_keras's own on the same machine and batch
(32, SGD with momentum for every model; the autoencoder's loss is the MSE against its input): the
litert artifact in a fresh process that imports ai-edge-litert only, tf_keras's compiled
``train_on_batch`` in a fresh process that imports TensorFlow; the median step and each process's
peak memory (VmHWM). ``--steps-only`` measures just these again, into
``--results``.

``--keep DIR`` keeps the first seed's float32 and dynamic int8 files, and ``--arm64 DIR`` times
them in the emulated 64-bit ARM userland (``structural.arm64``). Prints Markdown tables (medians
over seeds); ``--results`` keeps the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from structural import arm64, measure, one_run  # noqa: E402

from fedprune.converters.task import task_of  # noqa: E402
from fedprune.converters.trainable import build_trainable  # noqa: E402
from fedprune.coordinator import models  # noqa: E402
from fedprune.coordinator.broker import EmbeddedBroker  # noqa: E402
from fedprune.device_profiles import Precision  # noqa: E402

LITERT, KERAS = "raspberry-pi-4", "generic-x86-64"
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "keras devices": (KERAS, ["--target", "0"]),
    "dense": (LITERT, ["--target", "0"]),
    "weights 80%": (LITERT, ["--target", "0.8"]),
    "units 50%": (LITERT, ["--units", "l2", "--target", "0.5"]),
    "hybrid": (LITERT, ["--units", "l2", "--target", "0.5", "--weight-target", "0.8"]),
}
MODEL_FLAGS: dict[str, list[str]] = {  # added to every configuration's demo flags
    "autoencoder": ["--optimizer", "adam", "--lr", "0.01"],
}
BATCH, LR, MOMENTUM = 32, 0.05, 0.9
AUC_NOTE = (
    "AUC: the held-out ROC AUC of the reconstruction error as anomaly score (an anomaly detection"
    " proxy: devices train on digits 0-4, the held-out digits 5-9 are the anomalies)."
)

PEAK = """
def peak_mb():  # this process's own high-water mark (ru_maxrss keeps the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

LITERT_STEP = (
    PEAK
    + """
import statistics, sys, time
import numpy as np
from ai_edge_litert.interpreter import Interpreter
train = Interpreter(model_path=sys.argv[1]).get_signature_runner("train")
details = train.get_input_details()
rng = np.random.default_rng(0)
x = rng.random(details["x"]["shape"], dtype=np.float32)
if details["y"]["dtype"] != np.float32:  # a classifier's labels
    y = rng.integers(0, 10, x.shape[0]).astype(np.int64)
elif x.size == int(np.prod(details["y"]["shape"])):  # a reconstruction learns its input
    y = x.reshape(details["y"]["shape"])
else:
    y = rng.random(details["y"]["shape"], dtype=np.float32)
times = []
for i in range(int(sys.argv[2]) + 10):
    start = time.perf_counter()
    train(x=x, y=y)
    times.append(time.perf_counter() - start)
print(statistics.median(times[10:]) * 1000, peak_mb())
"""
)

KERAS_STEP = (
    PEAK
    + """
import os, statistics, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tf_keras
from fedprune.coordinator import models
model = models.build(sys.argv[1])
reconstruct = sys.argv[6] == "reconstruct"
model.compile(
    tf_keras.optimizers.SGD(float(sys.argv[3]), momentum=float(sys.argv[4])),
    "mse" if reconstruct else "sparse_categorical_crossentropy",
)
rng = np.random.default_rng(0)
x = rng.random((int(sys.argv[5]), *model.input_shape[1:]), dtype=np.float32)
if reconstruct:
    y = x.reshape(len(x), -1)
else:
    y = rng.integers(0, 10, x.shape[0]).astype(np.int64)
times = []
for i in range(int(sys.argv[2]) + 10):
    start = time.perf_counter()
    model.train_on_batch(x, y)
    times.append(time.perf_counter() - start)
print(statistics.median(times[10:]) * 1000, peak_mb())
"""
)


def _python(script: str, *args: object) -> tuple[float, float]:
    """Run ``script`` in a fresh interpreter; its median step (ms) and peak memory (MB)."""
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the step timing failed:\n{done.stderr[-3000:]}")
    ms, mb = done.stdout.split()
    return float(ms), float(mb)


def steps(model: str, count: int) -> dict[str, float]:
    """The litert artifact's train step against tf_keras's, each in its own process."""
    keras_model = models.build(model)
    task = task_of(keras_model)
    artifact = build_trainable(
        keras_model,
        batch_size=BATCH,
        optimizer="sgd",
        learning_rate=LR,
        momentum=MOMENTUM,
        task=task,
    )
    with tempfile.NamedTemporaryFile(suffix=".tflite") as file:
        file.write(artifact)
        file.flush()
        litert_ms, litert_mb = _python(LITERT_STEP, file.name, count)
    keras_ms, keras_mb = _python(KERAS_STEP, model, count, LR, MOMENTUM, BATCH, task.value)
    return {
        "litert_ms": litert_ms,
        "litert_mb": litert_mb,
        "keras_ms": keras_ms,
        "keras_mb": keras_mb,
    }


def report(rows: list[dict[str, Any]], step_rows: dict[str, dict[str, float]]) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]

        def med(config: str, get: Any, group: list[dict[str, Any]] = group) -> float:
            return statistics.median(get(r) for r in group if r["config"] == config)

        def export(
            config: str, p: Precision, dense_gzip: float, group: list[dict[str, Any]] = group
        ) -> str:
            """gzip bytes, x smaller and LiteRT score of ``config``'s ``p`` exports, or refused."""
            done = [r["exports"][p.value] for r in group if r["config"] == config]
            kept = [e for e in done if "refused" not in e]
            if not kept:
                return "refused | - | refused"
            packed = statistics.median(e["gzip"] for e in kept)
            score = statistics.median(e["accuracy"] for e in kept)
            some = (
                f" ({len(done) - len(kept)} of {len(done)} refused)"
                if len(kept) < len(done)
                else ""
            )
            return f"{packed:,.0f} | {dense_gzip / packed:.1f}x | {score:.3f}{some}"

        seeds = len({r["seed"] for r in group})
        metric = group[0].get("metric", "accuracy")  # results before "metric" are accuracies
        dense_acc = med("dense", lambda r: r["accuracy"])
        dense_lat = med("dense", lambda r: r["exports"]["float32"]["latency_ms"])
        dense_gzip = med("dense", lambda r: r["exports"]["float32"]["gzip"])
        print(f"\n#### {model}: medians of {seeds} seed(s)\n")
        if metric == "AUC":
            print(AUC_NOTE + "\n")
        print(
            f"| config | {metric} | vs dense | parameters | float32 latency ms | x faster |"
            f" full int8 gzip | x smaller | full int8 {metric} | dynamic int8 gzip | x smaller |"
            f" dynamic int8 {metric} |"
        )
        print("|---" * 12 + "|")
        for config in CONFIGS:
            if not any(r["config"] == config for r in group):
                continue
            acc = med(config, lambda r: r["accuracy"])
            lat = med(config, lambda r: r["exports"]["float32"]["latency_ms"])
            cells = [
                export(config, p, dense_gzip) for p in (Precision.FULL_INT8, Precision.DYNAMIC_INT8)
            ]
            print(
                f"| {config} | {acc:.3f} | {(acc - dense_acc) * 100:+.1f} pt"
                f" | {med(config, lambda r: r['parameters']):,.0f} | {lat:.4f}"
                f" | {dense_lat / lat:.1f}x | " + " | ".join(cells) + " |"
            )
        refusals = {
            f"{r['config']}, seed {r['seed']}, {precision}: {e['refused']}"
            for r in group
            for precision, e in r["exports"].items()
            if "refused" in e
        }
        if refusals:
            print("\nRefused exports:\n")
            for line in sorted(refusals):
                print(f"- {line}")
    print(
        "\n| model | litert step ms | tf_keras step ms | litert / tf_keras | litert peak MB |"
        " tf_keras peak MB | litert / tf_keras |"
    )
    print("|---" * 7 + "|")
    for model, s in step_rows.items():
        print(
            f"| {model} | {s['litert_ms']:.2f} | {s['keras_ms']:.2f}"
            f" | {s['litert_ms'] / s['keras_ms']:.2f} | {s['litert_mb']:.0f}"
            f" | {s['keras_mb']:.0f} | {s['litert_mb'] / s['keras_mb']:.2f} |"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="resnet8,dscnn,mobilenet")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=100, help="timed training steps per model")
    p.add_argument("--results", type=Path, default=None, help="keep the raw numbers here (JSON)")
    p.add_argument(
        "--report-only",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="only report saved --results again (several: their runs together)",
    )
    p.add_argument("--keep", type=Path, default=None, help="keep the first seed's .tflite here")
    p.add_argument("--arm64", type=Path, default=None, metavar="DIR", help="time DIR on arm64")
    p.add_argument("--steps-only", action="store_true", help="only the train steps, into --results")
    args = p.parse_args()
    if args.arm64 is not None:
        arm64(args.arm64.resolve())
        return 0
    if args.steps_only:
        saved = json.loads(args.results.read_text())
        saved["steps"] = {model: steps(model, args.steps) for model in args.models.split(",")}
        args.results.write_text(json.dumps(saved, indent=1))
        report(saved["runs"], saved["steps"])
        return 0
    if args.report_only:
        saved = [json.loads(path.read_text()) for path in args.report_only]
        steps_of = {model: s for one in reversed(saved) for model, s in one["steps"].items()}
        report([row for s in saved for row in s["runs"]], steps_of)  # first file wins
        return 0
    configs = args.configs.split(",")
    if unknown := [c for c in configs if c not in CONFIGS]:
        p.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    step_rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker("mosquitto") as broker:
        trained = []
        for model in args.models.split(","):
            for seed in seeds:
                for config in configs:
                    started = time.perf_counter()
                    profile, flags = CONFIGS[config]
                    flags = [*flags, *MODEL_FLAGS.get(model, [])]
                    run_dir = one_run(
                        broker.url,
                        Path(tmp),
                        model,
                        config=config,
                        seed=seed,
                        rounds=args.rounds,
                        clients=args.clients,
                        flags=flags,
                        profile=profile,
                    )
                    trained.append((model, seed, config, run_dir))
                    print(
                        f"{model} seed {seed} {config}: trained in"
                        f" {time.perf_counter() - started:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        for model, seed, config, run_dir in trained:  # measured together, one after the other
            keep = args.keep if seed == seeds[0] else None
            rows.append(
                {
                    "model": model,
                    "seed": seed,
                    "config": config,
                    **measure(run_dir, args.steps, keep),
                }
            )
            print(f"{model} seed {seed} {config}: measured", file=sys.stderr, flush=True)
        for model in args.models.split(","):
            step_rows[model] = steps(model, args.steps)
        if args.results is not None:
            args.results.write_text(json.dumps({"runs": rows, "steps": step_rows}, indent=1))
    report(rows, step_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
