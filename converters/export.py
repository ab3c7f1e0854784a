"""Export a model to TFLite for device profiles, verified under LiteRT before anything is written.

The profile decides everything: ``precision`` picks the converter hook, ``sparse_format`` asks for
TFLite's sparse encoding too, ``max_model_bytes`` and ``accuracy_tolerance`` are the limits the
export must meet, ``cores`` the interpreter threads the latency is measured with. An export that
breaks a limit is refused with a one-line ExportError and nothing is written.

Every export is verified in LiteRT's default interpreter (builtin kernels plus the XNNPACK
delegate), which is what a user's own ``Interpreter(model_path=...)`` gets: a file fedprune writes
for a device runs there. The sparse encoding is kept only when its file is smaller *and* runs
there (XNNPACK cannot prepare sparse int8 models); otherwise the dense file is kept and
``export.json`` says why.

Full int8 calibrates on samples kept apart from those it is scored on: without ``calibration``, a
share of the held-out rows chosen by content (``tflite.split_calibration``), so that a shuffled
copy of the same file gives the same export; ``export.json`` records which.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import tf_keras

from fedprune import device_profiles
from fedprune.converters.report import (
    MODEL_FILE,
    Budget,
    Calibration,
    ExportReport,
    write_export,
)
from fedprune.converters.strip import kernel_sparsity, load_keras, strip
from fedprune.converters.task import task_of
from fedprune.converters.tflite import (
    CALIBRATION_RULE,
    CALIBRATION_SAMPLES,
    CALIBRATION_SHARE,
    calibration_subset,
    sample_shape,
    samples_sha256,
    split_calibration,
    to_tflite,
)
from fedprune.converters.verify import model_latency, predict_keras
from fedprune.device_profiles import DEFAULT_PROFILE, DeviceProfile, Precision, ProfileError
from fedprune.edge_client import data as npz_data
from fedprune.edge_client.litert import (
    Runtime,
    TensorFormat,
    io_formats,
    open_model,
    predict,
)
from fedprune.edge_client.task import Evaluation, Task
from fedprune.protocol.errors import ConfigError, ExportError, ModelError
from fedprune.protocol.options import load_toml
from fedprune.protocol.topics import check_name

__all__ = [
    "DEFAULT_PROFILE",
    "ExportReport",
    "export_model",
    "export_profiles",
    "export_run",
    "load_run_model",
    "resolve_profile",
]

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
    calibration_source: Path | None = None,
    max_accuracy_drop: float | None = None,
    int8_io: bool = False,
    task: Task | None = None,
) -> ExportReport:
    """Convert ``model`` as ``profile`` asks, verify it under LiteRT, then write it to ``out_dir``.

    A classifier is scored by accuracy. A reconstruction (``task``, by default read from the
    model's output: converters.task) is scored by its mean squared error and, where ``y`` marks
    anomalies (0 normal), by the ROC AUC of its error: the LiteRT AUC may fall at most the
    tolerance below Keras's, or without anomaly labels its MSE rise at most that share above.

    ``x``/``y`` are the held-out samples both models are scored on. Full int8 calibrates on
    ``calibration`` when given (then every held-out sample is scored); otherwise on a share of the
    held-out rows chosen by content, which are then left out of the scoring. ``int8_io`` (full int8
    profiles only) gives the file int8 input and output. ``max_accuracy_drop`` overrides the
    profile's ``accuracy_tolerance``. ``source``, ``data`` and ``calibration_source`` (where the
    model, ``x`` and ``calibration`` came from) are only recorded.

    Raises:
        ConfigError: ``x``, ``y`` or ``calibration`` do not fit the model, or ``int8_io`` is asked
            of a profile that is not full int8.
        ExportError: conversion fails, LiteRT's default interpreter cannot run the result, or it
            breaks the profile's size or accuracy limit; nothing is written then.
    """
    name = profile.name
    try:
        shape = sample_shape(model)
    except ExportError as exc:
        raise ExportError(f"profile {name}: {exc}") from exc
    task = task or task_of(model)
    x = _shaped(x, shape, "x")
    y = np.asarray(y).reshape(-1)
    if len(x) == 0 or len(y) != len(x):
        raise ConfigError(f"need held-out samples with one label each, got {len(x)} and {len(y)}")
    if int8_io and profile.precision is not Precision.FULL_INT8:
        raise ConfigError(
            f"profile {name}: int8 input and output need precision full_int8, "
            f"not {profile.precision.value}"
        )
    given = None if calibration is None else _shaped(calibration, shape, "calibration")
    scored = _Scored.split(profile, x, y, given, calibration_source, data)
    # Measured here, on the coordinator's machine: more threads than it has would only measure
    # oversubscription, not the device.
    threads = min(profile.cores, os.cpu_count() or 1)
    encoded = _encode(model, profile, scored.calibration, int8_io)
    kept = _choose(name, encoded, scored.x, threads)
    if len(kept.content) > profile.max_model_bytes:
        raise ExportError(
            f"profile {name}: the {kept.variant} model is {len(kept.content):,} bytes, "
            f"over max_model_bytes {profile.max_model_bytes:,}; nothing written"
        )
    keras = task.evaluate(predict_keras(model, scored.x), scored.x, scored.y, anomalies=True)
    tflite = task.evaluate(kept.scores, scored.x, scored.y, anomalies=True)
    _check_scores(profile, keras, tflite, max_accuracy_drop)
    latency = _litert(name, lambda: model_latency(kept.content, scored.x[0], num_threads=threads))
    report = ExportReport(
        profile=name,
        precision=profile.precision,
        sparse_format=kept.sparse,
        sparse_format_rejected=kept.sparse_rejected,
        runtime=Runtime.DEFAULT.value,
        input=kept.input,
        output=kept.output,
        model_path=Path(out_dir) / MODEL_FILE,
        tflite_bytes=len(kept.content),
        gzip_bytes=len(gzip.compress(kept.content, compresslevel=9, mtime=0)),
        sha256=hashlib.sha256(kept.content).hexdigest(),
        dense_format_bytes=len(encoded.dense),
        sparse_format_bytes=None if encoded.sparse is None else len(encoded.sparse),
        keras_accuracy=keras.accuracy,
        tflite_accuracy=tflite.accuracy,
        n_eval=len(scored.y),
        calibration=scored.record,
        latency_ms_p50=latency.p50_ms,
        latency_ms_p95=latency.p95_ms,
        latency_ms_iqr=latency.iqr_ms,
        latency_runs=latency.runs,
        latency_invokes_per_run=latency.invokes_per_run,
        threads=threads,
        weight_sparsity=kernel_sparsity(model),
        budgets=_budgets(profile, latency.p50_ms, len(kept.content)),
        source=source,
        data=data,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        task=task.value,
        keras_auc=keras.auc,
        tflite_auc=tflite.auc,
        keras_mse=None if keras.accuracy is not None else keras.loss,
        tflite_mse=None if tflite.accuracy is not None else tflite.loss,
    )
    write_export(report, kept.content)
    return report


def _budgets(profile: DeviceProfile, latency_ms: float, size: int) -> tuple[Budget, ...]:
    """The profile's budgets this export is measured against (those it sets)."""
    budgets = []
    if profile.latency_budget_ms:
        budgets.append(Budget.check("latency_ms", profile.latency_budget_ms, latency_ms))
    if profile.size_budget_bytes:
        budgets.append(Budget.check("size_bytes", profile.size_budget_bytes, size))
    return tuple(budgets)


def export_run(
    run_dir: Path,
    profile: str | DeviceProfile = DEFAULT_PROFILE,
    data: Path | None = None,
    calibration: Path | None = None,
    *,
    max_accuracy_drop: float | None = None,
    int8_io: bool = False,
) -> ExportReport:
    """Export a finished run's model for one profile to ``RUN_DIR/export/<profile>/``.

    ``profile`` is a shipped profile's name, a path to a profile file, or a profile object.
    ``data`` replaces ``RUN_DIR/heldout.npz``; ``calibration`` (an .npz with ``x`` and ``y``, only
    ``x`` used) replaces the held-out rows set aside as full-int8 calibration samples. ``int8_io``
    asks a full-int8 profile for int8 input and output.

    Raises:
        ConfigError: missing run directory, model or data file, a bad profile, or ``int8_io`` for
            a profile that is not full int8.
        ExportError: as :func:`export_model`.
    """
    run_dir = _existing_run_dir(run_dir)
    chosen = resolve_profile(profile)
    inputs = _RunInputs.load(run_dir, data, calibration)
    return inputs.export(chosen, max_accuracy_drop, int8_io)


def export_profiles(
    run_dir: Path,
    profiles: Sequence[str | DeviceProfile],
    data: Path | None = None,
    calibration: Path | None = None,
    *,
    max_accuracy_drop: float | None = None,
    int8_io: bool = False,
    on_result: Callable[[DeviceProfile, ExportResult], None] | None = None,
    on_start: Callable[[DeviceProfile], None] | None = None,
) -> list[ExportResult]:
    """Export a run's model for several profiles; a refused profile is data, the others export.

    Every profile is resolved and the run's files are loaded before the first export, so a bad
    profile or data file fails the whole call (ConfigError) instead of half of it. ``int8_io``
    applies to the full-int8 profiles among them (the others' kernels take floats); at least one
    must be full int8. ``on_start`` hears each profile as its export begins, ``on_result`` each
    outcome as soon as it is known.
    """
    run_dir = _existing_run_dir(run_dir)
    chosen = [resolve_profile(p) for p in profiles]
    names = [p.name for p in chosen]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"profile {twice[0]!r} given twice (each export goes to export/<name>/)")
    if int8_io and not any(p.precision is Precision.FULL_INT8 for p in chosen):
        raise ConfigError(
            f"int8 input and output need a full_int8 profile; none of {', '.join(names)} is"
        )
    inputs = _RunInputs.load(run_dir, data, calibration)
    results: list[ExportResult] = []
    for profile in chosen:
        if on_start is not None:
            on_start(profile)
        int8 = int8_io and profile.precision is Precision.FULL_INT8
        try:
            result: ExportResult = inputs.export(profile, max_accuracy_drop, int8)
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
    check_name(profile.name, "profile name")  # it names the export folder and an MQTT topic
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
    calibration: np.ndarray | None
    calibration_path: Path | None
    task: Task  # the run's (its config.toml's ``task``), else read from the model

    @classmethod
    def load(cls, run_dir: Path, data: Path | None, calibration: Path | None) -> _RunInputs:
        data_path = Path(data) if data is not None else run_dir / "heldout.npz"
        heldout = npz_data.load(data_path, holdout=0.0)
        extra = None if calibration is None else _features(Path(calibration))
        model = load_run_model(run_dir)
        shape = sample_shape(model)
        x = _shaped(heldout.x, shape, str(data_path))
        samples = None if extra is None else _shaped(extra, shape, str(calibration))
        path = None if calibration is None else Path(calibration)
        config = run_dir / "config.toml"
        asked = load_toml(config).get("task", "auto") if config.is_file() else "auto"
        task = task_of(model, str(asked), source=str(run_dir))
        return cls(run_dir, model, data_path, x, heldout.y, samples, path, task)

    def export(
        self, profile: DeviceProfile, max_accuracy_drop: float | None, int8_io: bool
    ) -> ExportReport:
        return export_model(
            self.model,
            profile,
            x=self.x,
            y=self.y,
            calibration=self.calibration,
            out_dir=self.run_dir / "export" / profile.name,
            source=self.run_dir,
            data=self.data,
            calibration_source=self.calibration_path,
            max_accuracy_drop=max_accuracy_drop,
            int8_io=int8_io,
            task=self.task,
        )


@dataclass(frozen=True)
class _Scored:
    """The samples an export calibrates on (full int8 only) and the samples it is scored on."""

    calibration: np.ndarray | None
    record: Calibration | None
    x: np.ndarray
    y: np.ndarray

    @classmethod
    def split(
        cls,
        profile: DeviceProfile,
        x: np.ndarray,
        y: np.ndarray,
        given: np.ndarray | None,
        given_source: Path | None,
        data: Path | None,
    ) -> _Scored:
        """Given samples calibrate and every held-out row is scored; without them, a content-chosen
        share of the held-out rows calibrates and only the others are scored."""
        if profile.precision is not Precision.FULL_INT8:
            return cls(None, None, x, y)
        if given is not None:
            rows = calibration_subset(given)
            rule = f"at most {CALIBRATION_SAMPLES} distinct rows of x, {CALIBRATION_RULE}"
            return cls(rows, _record(rows, given_source, rule), x, y)
        try:
            split = split_calibration(x)
        except ConfigError as exc:
            raise ConfigError(f"profile {profile.name}: {exc}") from exc
        rule = (
            f"{CALIBRATION_SHARE:.0%} of the distinct held-out rows (at most "
            f"{CALIBRATION_SAMPLES}), {CALIBRATION_RULE}; not scored, nor their duplicates"
        )
        record = _record(split.calibration, data, rule)
        return cls(split.calibration, record, x[split.evaluate], y[split.evaluate])


def _record(rows: np.ndarray, source: Path | None, rule: str) -> Calibration:
    return Calibration(source=source, samples=len(rows), rule=rule, sha256=samples_sha256(rows))


def _check_scores(
    profile: DeviceProfile,
    keras: Evaluation,
    tflite: Evaluation,
    max_accuracy_drop: float | None,
) -> None:
    """Refuse an export whose LiteRT score (accuracy, AUC) falls more than the tolerance below
    Keras's; without a score (a reconstruction without anomaly labels), whose MSE rises more than
    the tolerance's share above Keras's."""
    tolerance, limit_name = (
        (profile.accuracy_tolerance, "accuracy_tolerance")
        if max_accuracy_drop is None
        else (max_accuracy_drop, "max_accuracy_drop")
    )
    if keras.score is not None and tflite.score is not None:
        if tflite.score < keras.score - tolerance - _SLACK:
            raise ExportError(
                f"profile {profile.name}: LiteRT {tflite.metric} {tflite.score:.4f} is below "
                f"{keras.score - tolerance:.4f} (Keras {keras.score:.4f} minus {limit_name} "
                f"{tolerance:g}) on {tflite.n} samples; nothing written"
            )
    elif tflite.loss > keras.loss * (1 + tolerance) + _SLACK:
        raise ExportError(
            f"profile {profile.name}: LiteRT MSE {tflite.loss:.4g} is above"
            f" {keras.loss * (1 + tolerance):.4g} (Keras {keras.loss:.4g} plus {limit_name}"
            f" {tolerance:g} of it) on {tflite.n} samples; nothing written"
        )


@dataclass(frozen=True)
class _Encoded:
    """The profile's precision in dense format and, when the profile asks for it, sparse format."""

    dense: bytes
    sparse: bytes | None
    precision: Precision


@dataclass(frozen=True)
class _Kept:
    """The file kept for a profile, its scores on the held-out samples in the default
    interpreter, its input and output formats, and why the sparse file was not kept."""

    content: bytes
    sparse: bool
    sparse_rejected: str | None
    scores: np.ndarray
    input: TensorFormat
    output: TensorFormat
    precision: Precision

    @classmethod
    def verified(
        cls,
        content: bytes,
        precision: Precision,
        x: np.ndarray,
        threads: int,
        *,
        sparse: bool,
        sparse_rejected: str | None,
    ) -> _Kept:
        """Run ``x`` through ``content`` in the default interpreter (ModelError if it cannot)."""
        interpreter = open_model(content, num_threads=threads, runtime=Runtime.DEFAULT).interpreter
        scores = predict(interpreter, x)
        inp, out = io_formats(interpreter)
        return cls(content, sparse, sparse_rejected, scores, inp, out, precision)

    @property
    def variant(self) -> str:
        return f"{self.precision.value}{' sparse-format' if self.sparse else ''}"


def _encode(
    model: tf_keras.Model, profile: DeviceProfile, calibration: np.ndarray | None, int8_io: bool
) -> _Encoded:
    """The profile's precision in dense format and, if asked, in sparse format too."""
    precision = profile.precision
    try:
        dense = to_tflite(model, precision=precision, calibration=calibration, int8_io=int8_io)
        sparse = (
            to_tflite(
                model, precision=precision, sparse=True, calibration=calibration, int8_io=int8_io
            )
            if profile.sparse_format
            else None
        )
    except ExportError as exc:
        raise ExportError(f"profile {profile.name}: {exc}") from exc
    return _Encoded(dense, sparse, precision)


def _choose(profile_name: str, encoded: _Encoded, x: np.ndarray, threads: int) -> _Kept:
    """The sparse file if it is smaller and runs ``x`` in the default interpreter, else the dense
    file, which must run there (a file a user's default ``Interpreter`` cannot run is refused)."""
    rejected = None
    if encoded.sparse is not None:
        if len(encoded.sparse) >= len(encoded.dense):
            rejected = (
                f"not smaller: {len(encoded.sparse):,} bytes against {len(encoded.dense):,} "
                "in dense format"
            )
        else:
            try:
                return _Kept.verified(
                    encoded.sparse, encoded.precision, x, threads, sparse=True, sparse_rejected=None
                )
            except ModelError as exc:
                rejected = str(exc)
    try:
        return _Kept.verified(
            encoded.dense, encoded.precision, x, threads, sparse=False, sparse_rejected=rejected
        )
    except ModelError as exc:
        raise ExportError(f"profile {profile_name}: LiteRT verification failed: {exc}") from exc


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
