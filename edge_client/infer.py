"""``fedprune-infer``: run an exported TFLite model on this device and time it (LiteRT only).

The model is a ``.tflite`` file or an export directory (``model.tflite`` plus the exporter's
``export.json``, whose recorded sha256, when present, must match the file). With ``--data`` the
samples are classified (and scored when the file has labels); in every case single-sample latency
is measured, so a device can be checked against its profile without TensorFlow installed.

The model runs in LiteRT's default interpreter (XNNPACK), as the exporter verified it; only a file
that interpreter cannot prepare (an older sparse-format int8 export) runs on the builtin kernels
alone, and the report says which runtime was used. Latency is measured as in ``export.json``:
timed runs of back-to-back invocations after a warm-up (``edge_client.litert.measure_latency``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedprune import __version__
from fedprune.edge_client import data as local_data
from fedprune.edge_client import litert
from fedprune.edge_client.litert import Latency, TensorFormat
from fedprune.edge_client.quiet import native_log_filtered
from fedprune.edge_client.task import Task, errors
from fedprune.protocol.errors import ConfigError, FedpruneError, ModelError, print_error
from fedprune.protocol.options import at_least_one

PROG = "fedprune-infer"
MODEL_FILE = "model.tflite"
EXPORT_FILE = "export.json"
RUNS = 100
SHOWN_PREDICTIONS = 20


@dataclass(frozen=True, kw_only=True)
class Export:
    """What the exporter recorded next to the model (fields it did not write are ``None``)."""

    profile: str | None
    precision: str | None
    accuracy: float | None
    n_eval: int | None
    sha256: str | None
    task: Task = Task.CLASSIFY  # an autoencoder's export says ``reconstruct``
    auc: float | None = None  # its LiteRT AUC on the held-out anomalies

    def describe(self) -> str:
        parts = [f"profile {self.profile or '?'}", f"precision {self.precision or '?'}"]
        on = f" on {self.n_eval} samples" if self.n_eval is not None else ""
        if self.accuracy is not None:
            parts.append(f"accuracy {self.accuracy:.4f}{on}")
        elif self.auc is not None:
            parts.append(f"a reconstruction, AUC {self.auc:.4f}{on}")
        parts.append("sha256 verified" if self.sha256 else "no sha256 recorded")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "precision": self.precision,
            "accuracy": self.accuracy,
            "n_eval": self.n_eval,
            "sha256_verified": self.sha256 is not None,
            "task": self.task.value,
            "auc": self.auc,
        }


@dataclass(frozen=True, kw_only=True)
class Features:
    """Samples to classify, with their labels when the file has them."""

    x: np.ndarray
    y: np.ndarray | None


@dataclass(frozen=True, kw_only=True)
class Report:
    """One invocation's results; ``accuracy``/``predictions`` are ``None`` when not computed. For
    an autoencoder the predictions are each sample's reconstruction error (its anomaly score)
    and ``mse`` their mean."""

    model: Path
    model_bytes: int
    export: Export | None
    runtime: str
    input: TensorFormat
    output: TensorFormat
    threads: int
    latency: Latency
    n: int | None
    accuracy: float | None
    predictions: np.ndarray | None
    labels: np.ndarray | None
    mse: float | None = None

    def to_json(self, *, predictions: bool) -> dict[str, Any]:
        """A JSON-ready dict; the predicted classes only when ``predictions`` is true."""
        out: dict[str, Any] = {
            "model": str(self.model),
            "export": self.export.to_json() if self.export else None,
            "input": self.input.to_json(),
            "output": self.output.to_json(),
            "runtime": self.runtime,
            "n": self.n,
            "accuracy": self.accuracy,
            "mse": self.mse,
            "latency_ms_p50": self.latency.p50_ms,
            "latency_ms_p95": self.latency.p95_ms,
            "latency_ms_iqr": list(self.latency.iqr_ms),
            "threads": self.threads,
            "runs": self.latency.runs,
            "invokes_per_run": self.latency.invokes_per_run,
        }
        if predictions and self.predictions is not None:
            out["predictions"] = self.predictions.tolist()
        return out

    def lines(self, *, all_predictions: bool) -> list[str]:
        """The human-readable report, one ``key  value`` line per fact."""
        rows = [("model", f"{self.model} ({self.model_bytes / 1024:.1f} KiB)")]
        if self.export is not None:
            rows.append(("export", self.export.describe()))
        rows += [
            ("runtime", self.runtime),
            ("input", self.input.describe()),
            ("output", self.output.describe()),
        ]
        if self.accuracy is not None:
            rows.append(("accuracy", f"{self.accuracy:.4f} on {self.n} samples"))
        if self.mse is not None:
            rows.append(("MSE", f"{self.mse:.4g} on {self.n} samples (reconstruction error)"))
        latency = self.latency
        timing = f"{latency.runs} runs, {self.threads} thread{'s' if self.threads > 1 else ''}"
        p50, p95 = _ms(latency.p50_ms), _ms(latency.p95_ms)
        rows.append(("latency", f"p50 {p50} ms, p95 {p95} ms ({timing})"))
        low, high = (_ms(v) for v in latency.iqr_ms)
        rows.append(
            (
                "timing",
                f"each run {latency.invokes_per_run:,} back-to-back invocations, after "
                f"{latency.warmup_invokes:,} warm-up ones; middle half of the runs {low}-{high} ms",
            )
        )
        text = [f"{key:<9} {value}" for key, value in rows]
        if self.predictions is not None and (all_predictions or self.labels is None):
            text += self._prediction_lines(all_predictions)
        return text

    def _prediction_lines(self, everything: bool) -> list[str]:
        assert self.predictions is not None
        if self.mse is not None:  # an autoencoder: each sample's error, its anomaly score
            errors = self.predictions if everything else self.predictions[:SHOWN_PREDICTIONS]
            more = len(self.predictions) - len(errors)
            tail = f" ... ({more} more; --predictions lists all)" if more > 0 else ""
            return [f"{'error':<9} " + " ".join(f"{e:.4g}" for e in errors) + tail]
        if not everything:
            shown = " ".join(str(int(p)) for p in self.predictions[:SHOWN_PREDICTIONS])
            more = len(self.predictions) - SHOWN_PREDICTIONS
            tail = f" ... ({more} more; --predictions lists all)" if more > 0 else ""
            return [f"{'predicted':<9} {shown}{tail}"]
        if self.labels is None:
            return ["sample  predicted"] + [
                f"{i:>6}  {int(p):>9}" for i, p in enumerate(self.predictions)
            ]
        return ["sample  predicted  label"] + [
            f"{i:>6}  {int(p):>9}  {int(y):>5}" + ("" if p == y else "  wrong")
            for i, (p, y) in enumerate(zip(self.predictions, self.labels, strict=True))
        ]


def _ms(value: float) -> str:
    """Milliseconds with three decimals, or three significant digits below 1 ms."""
    return f"{value:.3f}" if value >= 1 else f"{value:.3g}"


def locate(path: Path) -> tuple[Path, Path | None]:
    """The model file and, for an export directory, its ``export.json`` if there is one."""
    if path.is_dir():
        model, export = path / MODEL_FILE, path / EXPORT_FILE
        if not model.is_file():
            raise ModelError(f"{path}: no {MODEL_FILE} in this directory")
        return model, export if export.is_file() else None
    if not path.exists():
        raise ModelError(f"{path}: no such model file or directory")
    return path, None


def read_export(path: Path) -> Export:
    """Parse the exporter's ``export.json``; a garbled one is a ModelError naming the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable export report ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: not an export report (expected a JSON object)")
    accuracy, n_eval, sha = raw.get("tflite_accuracy"), raw.get("n_eval"), raw.get("sha256")
    auc = raw.get("tflite_auc")
    try:
        task = Task(raw.get("task", Task.CLASSIFY))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path}: unknown task {raw.get('task')!r}") from exc
    return Export(
        task=task,
        auc=float(auc) if isinstance(auc, int | float) else None,
        profile=str(raw["profile"]) if "profile" in raw else None,
        precision=str(raw["precision"]) if "precision" in raw else None,
        accuracy=float(accuracy) if isinstance(accuracy, int | float) else None,
        n_eval=n_eval if isinstance(n_eval, int) else None,
        sha256=sha.lower() if isinstance(sha, str) else None,
    )


def read_model(model: Path, export: Export | None) -> bytes:
    """The model's bytes, checked against the export's sha256 when it recorded one."""
    try:
        content = model.read_bytes()
    except OSError as exc:
        raise ModelError(f"{model}: cannot read the model ({exc.strerror or exc})") from exc
    if not content:
        raise ModelError(f"{model}: the model file is empty")
    if export is not None and export.sha256 is not None:
        actual = hashlib.sha256(content).hexdigest()
        if actual != export.sha256:
            raise ModelError(
                f"{model}: sha256 {actual[:12]}... does not match {EXPORT_FILE}'s "
                f"{export.sha256[:12]}...; the file changed after export"
            )
    return content


def load_features(path: Path, input_shape: tuple[int, ...] | None = None) -> Features:
    """Load ``x`` and, if present, integer labels ``y`` from a ``.npz``; problems are ConfigErrors.

    Unlike :func:`edge_client.data.load` the labels are optional and the sample order is kept, so
    predictions line up with the file. With ``input_shape`` each sample must have as many values.
    """
    arrays = local_data.read_npz(path)
    if "x" not in arrays:
        raise ConfigError(f"{path}: missing array x (the features); y (labels) is optional")
    x, y = arrays["x"], arrays.get("y")
    if y is not None:
        x, y = local_data.check_labelled(path, x, y)
    else:
        x = local_data.check_features(path, x)
    per_sample = int(np.prod(x.shape[1:]))
    if input_shape is not None and per_sample != int(np.prod(input_shape)):
        raise ConfigError(
            f"{path}: x has {per_sample} values per sample; the model wants {list(input_shape)}"
        )
    return Features(x=x.astype(np.float32), y=y)


def infer(path: Path, data: Path | None = None, *, threads: int = 1, runs: int = RUNS) -> Report:
    """Load the model (checking its export record), classify ``data`` if given, time one sample."""
    model, export_path = locate(path)
    export = read_export(export_path) if export_path is not None else None
    content = read_model(model, export)
    try:
        loaded = litert.open_model(content, num_threads=threads)
    except ModelError as exc:  # its message does not name the file
        raise ModelError(f"{model}: {exc}") from exc
    interpreter = loaded.interpreter
    shape = litert.input_shape(interpreter)
    features = load_features(data, shape) if data is not None else None
    predictions = accuracy = mse = None
    task = export.task if export is not None else Task.CLASSIFY
    if features is not None:
        scores = litert.predict(interpreter, features.x)
        if task is Task.RECONSTRUCT:
            predictions = errors(scores, features.x)
            mse = float(np.mean(predictions))
        else:
            predictions = np.argmax(scores, axis=-1)
            if features.y is not None:
                accuracy = litert.accuracy(scores, features.y)
    sample = features.x[0] if features is not None else np.zeros(shape, np.float32)
    latency = litert.measure_latency(interpreter, sample, runs=runs)
    inp, out = litert.io_formats(interpreter)
    return Report(
        model=model,
        model_bytes=len(content),
        export=export,
        runtime=loaded.describe(),
        input=inp,
        output=out,
        threads=threads,
        latency=latency,
        n=len(features.x) if features is not None else None,
        accuracy=accuracy,
        predictions=predictions,
        labels=features.y if features is not None else None,
        mse=mse,
    )


def parser() -> argparse.ArgumentParser:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run an exported TFLite model with LiteRT (no TensorFlow): print its input "
        "and output, classify a data file and score it if it has labels, and time single-sample "
        "inference.",
        epilog="Exit codes: 0 ok, 2 bad data file or flags, 4 model missing, unreadable or "
        f"changed since export (sha256 in {EXPORT_FILE}).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help=f"a .tflite file, or an export directory with {MODEL_FILE} (and {EXPORT_FILE})",
    )
    p.add_argument(
        "--data",
        type=Path,
        metavar="NPZ",
        help=".npz with x (features, reshaped to the model's input) and optional y (integer "
        "labels); without y the predicted classes are printed",
    )
    p.add_argument(
        "--threads",
        type=at_least_one,
        default=cpus,
        metavar="N",
        help=f"interpreter threads (default: {cpus}, this machine's CPU count)",
    )
    p.add_argument(
        "--runs",
        type=at_least_one,
        default=RUNS,
        metavar="N",
        help="timed runs of single-sample inference, each a block of back-to-back invocations "
        f"lasting about {litert.RUN_SECONDS * 1000:g} ms, after a warm-up of at least "
        f"{litert.WARMUP_INVOKES} invocations and {litert.WARMUP_SECONDS * 1000:g} ms; latency "
        f"is the median and 95th percentile of the runs' means (default: {RUNS})",
    )
    p.add_argument(
        "--predictions",
        action="store_true",
        help=f"list every sample's predicted class (default: the first {SHOWN_PREDICTIONS}, "
        "and only when the data has no labels)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with native_log_filtered():  # LiteRT announces its XNNPACK delegate on stderr
            report = infer(args.model, args.data, threads=args.threads, runs=args.runs)
    except (FedpruneError, OSError) as exc:
        return print_error(PROG, exc)
    except KeyboardInterrupt:
        return 130
    if args.json:
        show = args.predictions or (report.predictions is not None and report.labels is None)
        print(json.dumps(report.to_json(predictions=show)))
    else:
        print("\n".join(report.lines(all_predictions=args.predictions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
