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

MODEL_FILE = "model.tflite"
REPORT_FILE = "export.json"


@dataclass(frozen=True, kw_only=True)
class ExportReport:
    """One verified export for one device profile, as saved in ``export.json``.

    ``sparse_format`` says whether the kept file uses TFLite's sparse encoding; when the profile
    asked for it, both encodings were built (``dense_format_bytes``, ``sparse_format_bytes``) and
    the smaller raw file was kept. Latencies are single-sample invocations on the exporting host
    with ``threads`` interpreter threads (the profile's cores).
    """

    profile: str
    precision: Precision
    sparse_format: bool
    model_path: Path
    tflite_bytes: int
    gzip_bytes: int
    sha256: str
    dense_format_bytes: int
    sparse_format_bytes: int | None
    keras_accuracy: float
    tflite_accuracy: float
    n_eval: int
    latency_ms_p50: float
    latency_ms_p95: float
    threads: int
    weight_sparsity: float
    source: Path | None
    data: Path | None
    created: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: paths and the precision as strings, ``None`` as null."""
        return {
            f.name: str(v) if isinstance(v, Path | Precision) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }


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
