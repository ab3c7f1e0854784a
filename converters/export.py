"""Export a finished run's model to TFLite for one device profile, verified under LiteRT.

Layout read and written::

    RUN_DIR/model/stripped.keras     (or model/wrapped.keras, stripped here)
    RUN_DIR/heldout.npz              x, y  (overridden by ``data``)
    RUN_DIR/export/<profile>/model.tflite
    RUN_DIR/export/<profile>/export.json
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tf_keras

from converters.heldout import load_heldout
from converters.strip import kernel_sparsity, load_keras, strip
from converters.tflite import Precision, parse_precision, to_tflite
from converters.verify import evaluate_keras, evaluate_tflite
from edge_client.errors import ConfigError, ExportError

DEFAULT_PROFILE = "generic-x86-64"
MAX_ACCURACY_DROP = 0.01
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ExportReport:
    """What one export produced and how the TFLite model scored against its Keras source."""

    profile: str
    precision: Precision
    model_path: Path
    tflite_bytes: int
    gzip_bytes: int
    keras_accuracy: float
    tflite_accuracy: float
    n_eval: int
    weight_sparsity: float
    run_dir: Path
    data: Path
    created: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (paths and the precision as strings)."""
        return {
            f.name: str(v) if isinstance(v, Path | Precision) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }


def export_run(
    run_dir: Path,
    profile: str = DEFAULT_PROFILE,
    data: Path | None = None,
    *,
    precision: Precision | str = Precision.FLOAT32,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
) -> ExportReport:
    """Convert the run's model, check LiteRT accuracy against Keras, then write model and report.

    Raises:
        ConfigError: missing run directory, model or data file, or a bad profile name.
        ExportError: conversion fails, or TFLite accuracy is more than ``max_accuracy_drop``
            below Keras (nothing is written then).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a run directory (no such directory)")
    if not _PROFILE_NAME.fullmatch(profile):
        raise ConfigError(f"invalid profile name {profile!r} (letters, digits, '.', '_', '-')")
    chosen = parse_precision(precision)
    heldout = load_heldout(Path(data) if data is not None else run_dir / "heldout.npz")
    model = load_run_model(run_dir)
    model_bytes = to_tflite(model, precision=chosen)  # rejects multi-input models first
    heldout.check_input_shape(tuple(model.input_shape[1:]))
    keras_acc = evaluate_keras(model, heldout.x, heldout.y)
    tflite_acc = evaluate_tflite(model_bytes, heldout.x, heldout.y)
    if tflite_acc < keras_acc - max_accuracy_drop:
        raise ExportError(
            f"{run_dir}: TFLite accuracy {tflite_acc:.4f} is more than {max_accuracy_drop} "
            f"below Keras {keras_acc:.4f} on {len(heldout.y)} samples; nothing written"
        )

    out_dir = run_dir / "export" / profile
    report = ExportReport(
        profile=profile,
        precision=chosen,
        model_path=out_dir / "model.tflite",
        tflite_bytes=len(model_bytes),
        gzip_bytes=len(gzip.compress(model_bytes, compresslevel=9, mtime=0)),
        keras_accuracy=keras_acc,
        tflite_accuracy=tflite_acc,
        n_eval=len(heldout.y),
        weight_sparsity=kernel_sparsity(model),
        run_dir=run_dir,
        data=heldout.path,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(report.model_path, model_bytes)
    _write_atomic(out_dir / "export.json", (json.dumps(report.to_json(), indent=2) + "\n").encode())
    return report


def load_run_model(run_dir: Path) -> tf_keras.Model:
    """The run's stripped model: ``model/stripped.keras``, else ``model/wrapped.keras`` stripped."""
    stripped, wrapped = run_dir / "model" / "stripped.keras", run_dir / "model" / "wrapped.keras"
    if stripped.exists():
        return load_keras(stripped)
    if wrapped.exists():
        return strip(load_keras(wrapped))
    raise ConfigError(f"{run_dir}: no model/stripped.keras or model/wrapped.keras")


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write via a temporary sibling and rename, so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
