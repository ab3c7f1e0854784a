"""Export a model to TFLite for device profiles, verified under LiteRT before anything is written.

The profile decides everything: ``precision`` picks the converter hook, ``sparse_format`` asks for
TFLite's sparse encoding too (kept only when the raw file is smaller), ``max_model_bytes`` and
``accuracy_tolerance`` are the limits the export must meet, ``cores`` the interpreter threads the
latency is measured with. An export that breaks a limit is refused with a one-line ExportError and
nothing is written.

Layout read and written by :func:`export_run` and :func:`export_profiles`::

    RUN_DIR/model/stripped.keras     (or model/wrapped.keras, stripped here)
    RUN_DIR/heldout.npz              x, y  (overridden by ``data``)
    RUN_DIR/export/<profile>/model.tflite
    RUN_DIR/export/<profile>/export.json
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import tf_keras

from fedprune import device_profiles
from fedprune.converters.report import MODEL_FILE, ExportReport, write_export
from fedprune.converters.strip import kernel_sparsity, load_keras, strip
from fedprune.converters.tflite import sample_shape, to_tflite
from fedprune.converters.verify import evaluate_keras, evaluate_tflite, latency_percentiles_ms
from fedprune.device_profiles import DeviceProfile, Precision, ProfileError
from fedprune.edge_client import data as npz_data
from fedprune.edge_client.errors import ConfigError, ExportError, ModelError

__all__ = [
    "DEFAULT_PROFILE",
    "ExportReport",
    "export_model",
    "export_profiles",
    "export_run",
    "load_run_model",
    "resolve_profile",
]

DEFAULT_PROFILE = "generic-x86-64"
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SLACK = 1e-9  # accuracies are ratios of counts; do not refuse on a rounding error

_T = TypeVar("_T")

ExportResult = ExportReport | ExportError
"""One profile's outcome in :func:`export_profiles`: a report, or the reason it was refused."""


def export_model(
    model: tf_keras.Model,
    profile: DeviceProfile,
    *,
    x: np.ndarray,
    y: np.ndarray,
    calibration: np.ndarray | None = None,
    out_dir: Path,
    source: Path | None = None,
    data: Path | None = None,
    max_accuracy_drop: float | None = None,
) -> ExportReport:
    """Convert ``model`` as ``profile`` asks, verify it under LiteRT, then write it to ``out_dir``.

    ``x``/``y`` are the held-out samples both models are scored on; ``calibration`` (default:
    ``x``) feeds full-int8 conversion. ``max_accuracy_drop`` overrides the profile's
    ``accuracy_tolerance``. ``source`` and ``data`` are only recorded.

    Raises:
        ConfigError: ``x``, ``y`` or ``calibration`` do not fit the model.
        ExportError: conversion fails, LiteRT cannot run the result, or it breaks the profile's
            size or accuracy limit; nothing is written then.
    """
    name = profile.name
    try:
        shape = sample_shape(model)
    except ExportError as exc:
        raise ExportError(f"profile {name}: {exc}") from exc
    x = _shaped(x, shape, "x")
    y = np.asarray(y).reshape(-1)
    if len(x) == 0 or len(y) != len(x):
        raise ConfigError(f"need held-out samples with one label each, got {len(x)} and {len(y)}")
    samples = x if calibration is None else _shaped(calibration, shape, "calibration")
    # Measured here, on the coordinator's machine: more threads than it has would only measure
    # oversubscription, not the device.
    threads = min(profile.cores, os.cpu_count() or 1)
    encoded = _encode(model, profile, samples)
    model_bytes = encoded.kept
    if len(model_bytes) > profile.max_model_bytes:
        raise ExportError(
            f"profile {name}: the {encoded.variant} model is {len(model_bytes):,} bytes, "
            f"over max_model_bytes {profile.max_model_bytes:,}; nothing written"
        )
    keras_acc = evaluate_keras(model, x, y)
    tflite_acc = _litert(name, lambda: evaluate_tflite(model_bytes, x, y, num_threads=threads))
    _check_accuracy(profile, keras_acc, tflite_acc, len(y), max_accuracy_drop)
    p50, p95 = _litert(name, lambda: latency_percentiles_ms(model_bytes, x[0], num_threads=threads))
    report = ExportReport(
        profile=name,
        precision=profile.precision,
        sparse_format=encoded.sparse,
        model_path=Path(out_dir) / MODEL_FILE,
        tflite_bytes=len(model_bytes),
        gzip_bytes=len(gzip.compress(model_bytes, compresslevel=9, mtime=0)),
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        dense_format_bytes=encoded.dense_bytes,
        sparse_format_bytes=encoded.sparse_bytes,
        keras_accuracy=keras_acc,
        tflite_accuracy=tflite_acc,
        n_eval=len(y),
        latency_ms_p50=p50,
        latency_ms_p95=p95,
        threads=threads,
        weight_sparsity=kernel_sparsity(model),
        source=source,
        data=data,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_export(report, model_bytes)
    return report


def export_run(
    run_dir: Path,
    profile: str | DeviceProfile = DEFAULT_PROFILE,
    data: Path | None = None,
    calibration: Path | None = None,
    *,
    max_accuracy_drop: float | None = None,
) -> ExportReport:
    """Export a finished run's model for one profile to ``RUN_DIR/export/<profile>/``.

    ``profile`` is a shipped profile's name, a path to a profile file, or a profile object.
    ``data`` replaces ``RUN_DIR/heldout.npz``; ``calibration`` (an .npz with ``x`` and ``y``, only
    ``x`` used) replaces the held-out ``x`` as full-int8 calibration samples.

    Raises:
        ConfigError: missing run directory, model or data file, or a bad profile.
        ExportError: as :func:`export_model`.
    """
    run_dir = _existing_run_dir(run_dir)
    chosen = resolve_profile(profile)
    inputs = _RunInputs.load(run_dir, data, calibration)
    return inputs.export(chosen, max_accuracy_drop)


def export_profiles(
    run_dir: Path,
    profiles: Sequence[str | DeviceProfile],
    data: Path | None = None,
    calibration: Path | None = None,
    *,
    max_accuracy_drop: float | None = None,
    on_result: Callable[[DeviceProfile, ExportResult], None] | None = None,
) -> list[ExportResult]:
    """Export a run's model for several profiles; a refused profile is data, the others export.

    Every profile is resolved and the run's files are loaded before the first export, so a bad
    profile or data file fails the whole call (ConfigError) instead of half of it. ``on_result``
    hears each outcome as soon as it is known.
    """
    run_dir = _existing_run_dir(run_dir)
    chosen = [resolve_profile(p) for p in profiles]
    names = [p.name for p in chosen]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"profile {twice[0]!r} given twice (each export goes to export/<name>/)")
    inputs = _RunInputs.load(run_dir, data, calibration)
    results: list[ExportResult] = []
    for profile in chosen:
        try:
            result: ExportResult = inputs.export(profile, max_accuracy_drop)
        except ExportError as refused:
            result = refused
        results.append(result)
        if on_result is not None:
            on_result(profile, result)
    return results


def resolve_profile(profile: str | DeviceProfile) -> DeviceProfile:
    """A profile object from a shipped name or a file path; problems are one-line ConfigErrors."""
    if not isinstance(profile, DeviceProfile):
        try:
            profile = device_profiles.load(str(profile))
        except ProfileError as exc:
            raise ConfigError(str(exc)) from exc
    if not _PROFILE_NAME.fullmatch(profile.name):
        raise ConfigError(
            f"profile name {profile.name!r} cannot name an export folder "
            "(letters, digits, '.', '_', '-')"
        )
    return profile


def load_run_model(run_dir: Path) -> tf_keras.Model:
    """The run's stripped model: ``model/stripped.keras``, else ``model/wrapped.keras`` stripped."""
    stripped, wrapped = run_dir / "model" / "stripped.keras", run_dir / "model" / "wrapped.keras"
    if stripped.exists():
        return load_keras(stripped)
    if wrapped.exists():
        return strip(load_keras(wrapped))
    raise ConfigError(f"{run_dir}: no model/stripped.keras or model/wrapped.keras")


@dataclass(frozen=True)
class _RunInputs:
    """What a run directory provides to every export of it."""

    run_dir: Path
    model: tf_keras.Model
    data: Path
    x: np.ndarray
    y: np.ndarray
    calibration: np.ndarray

    @classmethod
    def load(cls, run_dir: Path, data: Path | None, calibration: Path | None) -> _RunInputs:
        data_path = Path(data) if data is not None else run_dir / "heldout.npz"
        heldout = npz_data.load(data_path, holdout=0.0)
        extra = None if calibration is None else _features(Path(calibration))
        model = load_run_model(run_dir)
        shape = sample_shape(model)
        x = _shaped(heldout.x, shape, str(data_path))
        samples = x if extra is None else _shaped(extra, shape, str(calibration))
        return cls(run_dir, model, data_path, x, heldout.y, samples)

    def export(self, profile: DeviceProfile, max_accuracy_drop: float | None) -> ExportReport:
        return export_model(
            self.model,
            profile,
            x=self.x,
            y=self.y,
            calibration=self.calibration,
            out_dir=self.run_dir / "export" / profile.name,
            source=self.run_dir,
            data=self.data,
            max_accuracy_drop=max_accuracy_drop,
        )


def _check_accuracy(
    profile: DeviceProfile,
    keras_acc: float,
    tflite_acc: float,
    n_eval: int,
    max_accuracy_drop: float | None,
) -> None:
    """Refuse an export whose LiteRT accuracy falls more than the tolerance below Keras."""
    tolerance, limit_name = (
        (profile.accuracy_tolerance, "accuracy_tolerance")
        if max_accuracy_drop is None
        else (max_accuracy_drop, "max_accuracy_drop")
    )
    if tflite_acc < keras_acc - tolerance - _SLACK:
        raise ExportError(
            f"profile {profile.name}: LiteRT accuracy {tflite_acc:.4f} is below "
            f"{keras_acc - tolerance:.4f} (Keras {keras_acc:.4f} minus {limit_name} "
            f"{tolerance:g}) on {n_eval} samples; nothing written"
        )


@dataclass(frozen=True)
class _Encoded:
    """The file kept for a profile, and the raw sizes of the encodings that were built."""

    kept: bytes
    sparse: bool
    dense_bytes: int
    sparse_bytes: int | None
    precision: Precision

    @property
    def variant(self) -> str:
        return f"{self.precision.value}{' sparse-format' if self.sparse else ''}"


def _encode(model: tf_keras.Model, profile: DeviceProfile, calibration: np.ndarray) -> _Encoded:
    """The profile's precision in dense format and, if asked, sparse format; the smaller is kept."""
    precision = profile.precision
    try:
        dense = to_tflite(model, precision=precision, calibration=calibration)
        if not profile.sparse_format:
            return _Encoded(dense, False, len(dense), None, precision)
        sparse = to_tflite(model, precision=precision, sparse=True, calibration=calibration)
    except ExportError as exc:
        raise ExportError(f"profile {profile.name}: {exc}") from exc
    smaller = len(sparse) < len(dense)
    return _Encoded(sparse if smaller else dense, smaller, len(dense), len(sparse), precision)


def _litert(profile_name: str, measure: Callable[[], _T]) -> _T:
    """Run a LiteRT measurement; a model LiteRT cannot load or run fails the export."""
    try:
        return measure()
    except ModelError as exc:
        raise ExportError(f"profile {profile_name}: LiteRT verification failed: {exc}") from exc


def _shaped(x: np.ndarray, shape: tuple[int, ...], label: str) -> np.ndarray:
    """``x`` as float32 rows of the model's input ``shape``, or a ConfigError naming ``label``."""
    x = np.asarray(x, dtype=np.float32)
    per_sample = int(np.prod(x.shape[1:])) if x.ndim > 1 else -1
    if per_sample != int(np.prod(shape)):
        raise ConfigError(
            f"{label}: samples of shape {x.shape[1:]} do not fit the model's input {list(shape)}"
        )
    return x.reshape((-1, *shape))


def _existing_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a run directory (no such directory)")
    return run_dir


def _features(path: Path) -> np.ndarray:
    """The ``x`` of a calibration .npz (labels, if any, are not needed)."""
    arrays = npz_data.read_npz(path)
    if "x" not in arrays:
        raise ConfigError(f"{path}: missing array x (the calibration samples)")
    return npz_data.check_features(path, arrays["x"])
