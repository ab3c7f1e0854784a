"""Exporting a run directory for device profiles: files written, limits enforced, bad inputs."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedprune.converters import ExportReport, export_profiles, export_run, load_keras
from fedprune.converters.report import REPORT_FILE
from fedprune.protocol.errors import ConfigError, ExportError

SPARSITY = 0.8
RunFactory = Callable[..., Path]


@pytest.mark.slow
def test_export_json_records_the_export_and_matches_the_file(make_run: RunFactory) -> None:
    run = make_run()

    report = export_run(run, profile="raspberry-pi-4")

    out = run / "export" / "raspberry-pi-4"
    payload = (out / "model.tflite").read_bytes()
    saved = json.loads((out / REPORT_FILE).read_text())
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.tflite"]  # no temp files
    assert payload[4:8] == b"TFL3"
    assert saved == report.to_json()
    assert saved["profile"] == "raspberry-pi-4"
    assert (saved["precision"], saved["threads"]) == ("dynamic_int8", min(4, os.cpu_count() or 1))
    assert saved["sha256"] == hashlib.sha256(payload).hexdigest()
    assert saved["tflite_bytes"] == len(payload)
    assert saved["gzip_bytes"] == len(gzip.compress(payload, compresslevel=9, mtime=0))
    # The sparse int8 file is smaller, but XNNPACK cannot prepare it: the dense file is kept.
    assert saved["sparse_format_bytes"] < saved["dense_format_bytes"] == saved["tflite_bytes"]
    assert saved["sparse_format"] is False
    assert saved["sparse_format_rejected"].startswith(
        "LiteRT's default interpreter (XNNPACK) cannot prepare the model: failed to delegate "
    )
    assert saved["runtime"] == "default interpreter (XNNPACK)"
    assert saved["input"] == {"dtype": "float32", "shape": [8, 8, 1]}
    assert saved["output"] == {"dtype": "float32", "shape": [10]}
    assert saved["n_eval"] == 450
    assert saved["calibration"] is None  # dynamic_int8 needs no calibration samples
    assert 0 < saved["latency_ms_p50"] <= saved["latency_ms_p95"]
    low, high = saved["latency_ms_iqr"]
    assert 0 < low <= saved["latency_ms_p50"] <= high
    assert saved["latency_runs"] == 30
    assert saved["latency_invokes_per_run"] >= 1
    assert saved["weight_sparsity"] == pytest.approx(SPARSITY, abs=0.02)
    assert (saved["source"], saved["data"]) == (str(run), str(run / "heldout.npz"))
    assert set(saved) == {f.name for f in dataclasses.fields(ExportReport)}
    assert {"created", "model_path", "keras_accuracy", "tflite_accuracy"} <= set(saved)


@pytest.mark.slow
def test_default_profile_exports_float32_within_its_tolerance(make_run: RunFactory) -> None:
    report = export_run(make_run())

    assert (report.profile, report.precision.value, report.sparse_format) == (
        "generic-x86-64",
        "float32",
        False,
    )
    assert report.keras_accuracy > 0.85
    assert abs(report.tflite_accuracy - report.keras_accuracy) <= 0.005
    assert report.gzip_bytes < 0.5 * report.tflite_bytes  # 80% zeros compress


@pytest.mark.slow
def test_wrapped_model_is_stripped_when_no_stripped_file(make_run: RunFactory) -> None:
    run = make_run("wrapped.keras")

    report = export_run(run)

    assert report.weight_sparsity == pytest.approx(SPARSITY, abs=0.02)
    assert (run / "export" / "generic-x86-64" / "model.tflite").is_file()


@pytest.mark.slow
def test_model_over_max_model_bytes_is_refused_and_nothing_written(
    make_run: RunFactory, write_profile: Callable[..., Path]
) -> None:
    run = make_run()
    tiny = write_profile("tiny-device", max_model_bytes=1_000)

    with pytest.raises(ExportError) as caught:
        export_run(run, profile=str(tiny))

    message = str(caught.value)
    assert message.startswith("profile tiny-device: the float32 model is ")
    assert "over max_model_bytes 1,000; nothing written" in message
    assert "\n" not in message
    assert not (run / "export").exists()


@pytest.mark.slow
def test_refused_profile_is_data_and_the_others_still_export(
    make_run: RunFactory, write_profile: Callable[..., Path]
) -> None:
    run = make_run()
    tiny = write_profile("tiny-device", max_model_bytes=1_000)
    heard: list[str] = []

    results = export_profiles(
        run, [str(tiny), "jetson-nano"], on_result=lambda p, r: heard.append(p.name)
    )

    refused, exported = results
    assert isinstance(refused, ExportError) and "max_model_bytes" in str(refused)
    assert isinstance(exported, ExportReport) and exported.precision.value == "float16"
    assert heard == ["tiny-device", "jetson-nano"]
    assert sorted(p.name for p in (run / "export").iterdir()) == ["jetson-nano"]


@pytest.mark.slow
def test_same_profile_twice_is_a_config_error(make_run: RunFactory) -> None:
    run = make_run()

    with pytest.raises(ConfigError, match="'jetson-nano' given twice"):
        export_profiles(run, ["jetson-nano", "jetson-nano"])

    assert not (run / "export").exists()


@pytest.mark.parametrize(
    ("profile", "reason"),
    [
        ("no-such-board", "unknown device profile 'no-such-board'"),
        ("missing/board.toml", "no such file"),
    ],
)
def test_bad_profile_is_a_one_line_config_error(
    make_run: RunFactory, profile: str, reason: str
) -> None:
    run = make_run()

    with pytest.raises(ConfigError, match=reason) as caught:
        export_run(run, profile=profile)

    assert "\n" not in str(caught.value)
    assert not (run / "export").exists()


def test_invalid_profile_file_names_the_field(
    make_run: RunFactory, write_profile: Callable[..., Path]
) -> None:
    bad = write_profile("bad-board", precision="int4")

    with pytest.raises(ConfigError, match="field 'precision' must be one of .*got 'int4'"):
        export_run(make_run(), profile=str(bad))


def _write_npz_without_y(path: Path) -> None:
    np.savez(path, x=np.zeros((3, 8, 8, 1), np.float32))


def _write_npy_named_npz(path: Path) -> None:
    with path.open("wb") as f:
        np.save(f, np.zeros(3))


BAD_FILES = [
    pytest.param(None, "no such data file", id="missing"),
    pytest.param(lambda p: p.write_bytes(b"not a zip archive"), "not a .npz archive", id="garbage"),
    pytest.param(_write_npy_named_npz, "not a .npz archive", id="npy"),
    pytest.param(
        lambda p: np.savez(p, x=np.zeros((3, 4, 4, 1)), y=np.zeros(3, int)),
        r"do not fit the model's input \[8, 8, 1\]",
        id="wrong-shape",
    ),
]
# Held-out data needs labels; calibration samples do not (see the test below).
CASES = (
    [pytest.param(*p.values, "data", id=f"data-{p.id}") for p in BAD_FILES]
    + [pytest.param(_write_npz_without_y, "missing array.*y", "data", id="data-no-y")]
    + [pytest.param(*p.values, "calibration", id=f"calibration-{p.id}") for p in BAD_FILES]
)


@pytest.mark.slow
@pytest.mark.parametrize(("writer", "reason", "option"), CASES)
def test_bad_data_or_calibration_file_raises_config_error(
    make_run: RunFactory,
    tmp_path: Path,
    writer: Callable[[Path], object] | None,
    reason: str,
    option: str,
) -> None:
    run = make_run()
    bad = tmp_path / "bad.npz"
    if writer is not None:
        writer(bad)

    with pytest.raises(ConfigError, match=reason) as caught:
        export_run(run, profile="raspberry-pi-3b", **{option: bad})  # type: ignore[arg-type]

    assert str(bad) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (run / "export").exists()


@pytest.mark.slow
def test_calibration_samples_need_no_labels(make_run: RunFactory, tmp_path: Path) -> None:
    run = make_run()
    with np.load(run / "heldout.npz") as npz:
        np.savez(tmp_path / "calibration.npz", x=npz["x"][:50])

    report = export_run(run, profile="raspberry-pi-3b", calibration=tmp_path / "calibration.npz")

    assert report.precision == "full_int8"
    assert report.model_path.is_file()


def test_missing_run_dir_and_model_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        export_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "empty" / "heldout.npz", x=np.zeros((2, 64)), y=np.zeros(2, int))
    with pytest.raises(ConfigError, match="no model/stripped.keras or model/wrapped.keras"):
        export_run(tmp_path / "empty")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 garbage", b"\x89HDF\r\n\x1a\n garbage"])
def test_non_keras_model_file_raises_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.keras"
    path.write_bytes(content)

    with pytest.raises(ConfigError, match=r"model\.keras: not a Keras model file \(") as caught:
        load_keras(path)

    assert "\n" not in str(caught.value)


def test_missing_model_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a Keras model file \\(no such file\\)"):
        load_keras(tmp_path / "absent.h5")
