"""What one export produced, and writing it beside the model without half-written files."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedprune.device_profiles import Precision
from fedprune.edge_client.litert import TensorFormat

MODEL_FILE = "model.tflite"
REPORT_FILE = "export.json"


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Which samples set a full-int8 export's activation ranges.

    ``source`` is the file they came from (``None`` when the caller passed arrays), ``samples``
    how many distinct rows were used, ``rule`` how they were chosen, and ``sha256`` one digest of
    the set (of its rows' sorted SHA-256s): two exports calibrated on the same rows show the same.
    """

    source: Path | None
    samples: int
    rule: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "source": None if self.source is None else str(self.source),
            "samples": self.samples,
            "rule": self.rule,
            "sha256": self.sha256,
        }


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A profile's budget and whether the export meets it: ``latency_ms`` (the p50 measured on
    the exporting host) or ``size_bytes`` (the .tflite file)."""

    name: str
    limit: float
    measured: float
    met: bool

    @classmethod
    def check(cls, name: str, limit: float, measured: float) -> Budget:
        return cls(name=name, limit=limit, measured=measured, met=measured <= limit)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class ExportReport:
    """One verified export for one device profile, as saved in ``export.json``.

    ``sparse_format`` says whether the kept file uses TFLite's sparse encoding; when the profile
    asked for it, both encodings were built (``dense_format_bytes``, ``sparse_format_bytes``) and
    the sparse one was kept only if it is smaller and runs in LiteRT's default interpreter;
    otherwise ``sparse_format_rejected`` says why it was not kept. ``runtime`` is what the file
    needs to run (and was verified in): LiteRT's default interpreter, as ``Interpreter(model_path=
    ...)`` creates it. ``input``/``output`` give the dtypes a caller feeds and reads (float32 unless
    the export was asked for int8 I/O). ``n_eval`` counts the held-out samples both models were
    scored on; for full int8, ``calibration`` says which samples calibrated it, and samples taken
    from the held-out set are not among the ``n_eval``. Latencies are single-sample invocations on
    the exporting host with ``threads`` interpreter threads (the profile's cores, capped by the
    host's): the median and 95th percentile over ``latency_runs`` timed runs of
    ``latency_invokes_per_run`` back-to-back invocations each, and the runs' interquartile range.
    ``budgets`` are the profile's latency and size budgets and whether this export meets them.
    """

    profile: str
    precision: Precision
    sparse_format: bool
    sparse_format_rejected: str | None
    runtime: str
    input: TensorFormat
    output: TensorFormat
    model_path: Path
    tflite_bytes: int
    gzip_bytes: int
    sha256: str
    dense_format_bytes: int
    sparse_format_bytes: int | None
    keras_accuracy: float | None  # a classifier's (None: a reconstruction, scored below)
    tflite_accuracy: float | None
    n_eval: int
    calibration: Calibration | None
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_iqr: tuple[float, float]
    latency_runs: int
    latency_invokes_per_run: int
    threads: int
    weight_sparsity: float
    budgets: tuple[Budget, ...]
    source: Path | None
    data: Path | None
    created: str
    task: str = "classify"  # what the model learns (edge_client.task.Task)
    keras_auc: float | None = None  # a reconstruction's, where the held-out labels mark anomalies
    tflite_auc: float | None = None
    keras_mse: float | None = None  # a reconstruction's mean squared error
    tflite_mse: float | None = None

    @property
    def tflite_score(self) -> float | None:
        """What the export is verified on: its LiteRT accuracy, or a reconstruction's AUC."""
        return self.tflite_accuracy if self.tflite_accuracy is not None else self.tflite_auc

    def scores(self) -> str:
        """``LiteRT accuracy 0.9600 (Keras 0.9611, 360 samples)``, or its AUC and MSE."""
        if self.keras_accuracy is not None and self.tflite_accuracy is not None:
            litert, keras = f"accuracy {self.tflite_accuracy:.4f}", f"{self.keras_accuracy:.4f}"
        else:
            auc = (
                ""
                if self.tflite_auc is None or self.keras_auc is None
                else f"AUC {self.tflite_auc:.4f} (Keras {self.keras_auc:.4f}), "
            )
            litert, keras = f"{auc}MSE {self.tflite_mse:.4g}", f"{self.keras_mse:.4g}"
        return f"LiteRT {litert} (Keras {keras}, {self.n_eval} samples)"

    @property
    def int8_io(self) -> bool:
        """Whether the file takes and returns int8 (no float conversion ops at its ends)."""
        return self.input.dtype == "int8" and self.output.dtype == "int8"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: paths and the precision as strings, ``None`` as null."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: object) -> Any:
    """``value`` as JSON-ready data: nested records through their ``to_json``, tuples as lists."""
    if isinstance(value, Path | Precision):
        return str(value)
    if isinstance(value, Calibration | TensorFormat | Budget):
        return value.to_json()
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def write_export(report: ExportReport, model_bytes: bytes) -> None:
    """Write the model and ``export.json`` beside it, each through a temporary file and a rename.

    Both temporary files are complete before either rename, so a failure while writing leaves the
    previous export (if any) untouched.
    """
    out_dir = report.model_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report.to_json(), indent=2) + "\n"
    staged: list[tuple[Path, Path]] = []
    try:
        staged.append((_stage(out_dir, model_bytes), report.model_path))
        staged.append((_stage(out_dir, text.encode()), out_dir / REPORT_FILE))
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _stage(folder: Path, payload: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        tmp.chmod(0o644)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
