"""``fedprune-infer`` on real TFLite digits classifiers, run in-process under LiteRT.

The models are built once, in a subprocess, so that this module never imports TensorFlow itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedprune.edge_client.infer import main
from fedprune.edge_client.litert import LATENCY_RUNS, Runtime, measure_latency, open_model

VARIANTS = ("float32", "int8")
N_TEST = 450


@pytest.fixture
def unlabelled(models: Path, tmp_path: Path) -> Path:
    """The first 30 held-out samples without labels."""
    path = tmp_path / "unlabelled.npz"
    with np.load(models / "digits.npz") as npz:
        np.savez(path, x=npz["x"][:30])
    return path


def _labels(models: Path, n: int) -> np.ndarray:
    with np.load(models / "digits.npz") as npz:
        labels: np.ndarray = npz["y"][:n]
    return labels


def _field(out: str, key: str) -> str:
    """The value of a ``key  value`` line in the text report."""
    lines = [line for line in out.splitlines() if line.startswith(f"{key} ")]
    assert len(lines) == 1, out
    return lines[0][len(key) :].strip()


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_labelled_data_prints_accuracy_and_sample_count(
    models: Path, variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main([str(models / variant), "--data", str(models / "digits.npz"), "--runs", "5"])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    match = re.fullmatch(r"(\d\.\d{4}) on (\d+) samples", _field(out, "accuracy"))
    assert match is not None, out
    assert float(match[1]) > 0.8
    assert int(match[2]) == N_TEST
    assert "predicted" not in out  # labelled data: the score, not 450 predictions


@pytest.mark.slow
def test_int8_variant_is_smaller_and_as_accurate_as_float32(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    results = {}
    for variant in VARIANTS:
        main([str(models / variant), "--data", str(models / "digits.npz"), "--runs", "1", "--json"])
        results[variant] = json.loads(capsys.readouterr().out)

    # Assert
    sizes = {v: (models / v / "model.tflite").stat().st_size for v in VARIANTS}
    assert sizes["int8"] < 0.6 * sizes["float32"]
    assert abs(results["int8"]["accuracy"] - results["float32"]["accuracy"]) <= 0.02


@pytest.mark.slow
def test_json_output_is_one_object_with_the_measurements(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    model = models / "float32"

    # Execute
    code = main([str(model), "--data", str(models / "digits.npz"), "--runs", "7", "--json"])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert len(out.splitlines()) == 1
    report = json.loads(out)
    assert report["model"] == str(model / "model.tflite")
    assert report["n"] == N_TEST
    assert report["accuracy"] > 0.8
    assert 0 < report["latency_ms_p50"] <= report["latency_ms_p95"]
    assert report["threads"] == (os.cpu_count() or 1)
    assert report["runs"] == 7
    assert report["input"] == {"dtype": "float32", "shape": [64]}
    assert report["output"] == {"dtype": "float32", "shape": [10]}
    assert report["export"] is None
    assert "predictions" not in report


@pytest.mark.slow
def test_json_predictions_when_asked_match_the_labels(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main(
        [str(models / "float32"), "--data", str(models / "digits.npz"), "--runs", "1"]
        + ["--json", "--predictions"]
    )

    # Assert
    report = json.loads(capsys.readouterr().out)
    predictions = np.array(report["predictions"])
    assert code == 0
    assert predictions.shape == (N_TEST,)
    assert np.mean(predictions == _labels(models, N_TEST)) == pytest.approx(report["accuracy"])


@pytest.mark.slow
def test_data_without_labels_prints_the_first_predictions(
    models: Path, unlabelled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main([str(models / "float32"), "--data", str(unlabelled), "--runs", "1"])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    shown, _, rest = _field(out, "predicted").partition(" ... ")
    predicted = np.array([int(p) for p in shown.split()])
    assert len(predicted) == 20
    assert np.mean(predicted == _labels(models, 20)) > 0.8
    assert rest == "(10 more; --predictions lists all)"
    assert "accuracy" not in out


@pytest.mark.slow
def test_predictions_flag_lists_every_sample(
    models: Path, unlabelled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main([str(models / "int8"), "--data", str(unlabelled), "--runs", "1", "--predictions"])

    # Assert
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("sample  predicted")
    rows = [line.split() for line in lines[start + 1 :]]
    assert code == 0
    assert [int(i) for i, _ in rows] == list(range(30))
    assert np.mean(np.array([int(p) for _, p in rows]) == _labels(models, 30)) > 0.8


@pytest.mark.slow
def test_two_threads_give_the_same_accuracy(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    args = [str(models / "float32"), "--data", str(models / "digits.npz"), "--runs", "3"]

    # Execute
    one = main([*args, "--threads", "1"])
    one_out = capsys.readouterr().out
    two = main([*args, "--threads", "2"])
    two_out = capsys.readouterr().out

    # Assert
    assert one == two == 0
    assert _field(one_out, "accuracy") == _field(two_out, "accuracy")
    assert _field(two_out, "latency").endswith("(3 runs, 2 threads)")
    assert _field(one_out, "latency").endswith("(3 runs, 1 thread)")


@pytest.mark.slow
def test_without_data_prints_shapes_and_latency(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main([str(models / "float32" / "model.tflite"), "--runs", "5", "--threads", "1"])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert _field(out, "input") == "float32 (N, 64)"
    assert _field(out, "output") == "float32 (N, 10)"
    assert re.fullmatch(
        r"p50 [\d.e-]+ ms, p95 [\d.e-]+ ms \(5 runs, 1 thread\)", _field(out, "latency")
    )
    assert "accuracy" not in out and "predicted" not in out


@pytest.mark.slow
def test_text_report_names_the_runtime_and_how_latency_was_timed(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main([str(models / "int8"), "--runs", "4", "--threads", "1"])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert _field(out, "runtime") == "default interpreter (XNNPACK)"
    timing = re.fullmatch(
        r"each run ([\d,]+) back-to-back invocations, after ([\d,]+) warm-up ones; "
        r"middle half of the runs ([\d.e-]+)-([\d.e-]+) ms",
        _field(out, "timing"),
    )
    assert timing is not None, out
    assert int(timing[1].replace(",", "")) >= 1
    assert int(timing[2].replace(",", "")) >= 10
    assert float(timing[3]) <= float(timing[4])


@pytest.mark.slow
def test_json_latency_has_its_spread_and_the_invocations_per_run(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main([str(models / "float32"), "--runs", "9", "--threads", "1", "--json"])

    # Assert
    report = json.loads(capsys.readouterr().out)
    low, high = report["latency_ms_iqr"]
    assert code == 0
    assert report["runtime"] == "default interpreter (XNNPACK)"
    assert report["runs"] == 9
    assert report["invokes_per_run"] >= 1
    assert 0 < low <= report["latency_ms_p50"] <= high <= report["latency_ms_p95"]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_the_same_bytes_measured_twice_give_medians_within_3x(models: Path, threads: int) -> None:
    # Prepare: two interpreters over the same bytes, as two exports of the same file would be
    content = (models / "float32" / "model.tflite").read_bytes()
    sample = np.zeros(64, np.float32)

    # Execute
    first, second = (
        measure_latency(open_model(content, num_threads=threads).interpreter, sample)
        for _ in range(2)
    )

    # Assert: a stability check, not a speed one (single invokes once differed 65x)
    assert first.runs == second.runs == LATENCY_RUNS
    assert first.invokes_per_run > 1  # a microsecond model is timed in blocks, not one by one
    ratio = max(first.p50_ms, second.p50_ms) / min(first.p50_ms, second.p50_ms)
    assert ratio <= 3.0, (first, second)


def test_a_model_the_default_interpreter_prepares_does_not_fall_back(models: Path) -> None:
    # Execute
    loaded = open_model(models / "int8" / "model.tflite")

    # Assert
    assert (loaded.runtime, loaded.fallback) == (Runtime.DEFAULT, None)
    assert loaded.describe() == "default interpreter (XNNPACK)"


@pytest.mark.slow
def test_export_json_with_the_right_sha256_is_verified_and_described(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    export = shutil.copytree(models / "float32", tmp_path / "rpi4-64")
    digest = hashlib.sha256((export / "model.tflite").read_bytes()).hexdigest()
    report = {"profile": "rpi4-64", "precision": "float32", "tflite_accuracy": 0.9511}
    (export / "export.json").write_text(json.dumps({**report, "n_eval": 450, "sha256": digest}))

    # Execute
    code = main([str(export), "--runs", "1"])

    # Assert
    assert code == 0
    assert _field(capsys.readouterr().out, "export") == (
        "profile rpi4-64, precision float32, accuracy 0.9511 on 450 samples, sha256 verified"
    )


@pytest.mark.slow
def test_export_json_sha256_mismatch_exits_4(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    export = shutil.copytree(models / "float32", tmp_path / "rpi4-64")
    (export / "export.json").write_text(json.dumps({"profile": "rpi4-64", "sha256": "ab" * 32}))

    # Execute
    code = main([str(export), "--runs", "1"])

    # Assert
    line = _one_error_line(capsys)
    assert code == 4
    assert line.startswith(f"fedprune-infer: error: {export / 'model.tflite'}: sha256 ")
    assert "does not match export.json's abababababab..." in line


def test_a_missing_model_exits_4_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    missing = tmp_path / "nothing.tflite"

    # Execute
    code = main([str(missing)])

    # Assert
    assert code == 4
    assert _one_error_line(capsys) == (
        f"fedprune-infer: error: {missing}: no such model file or directory"
    )


def test_a_directory_without_a_model_exits_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main([str(tmp_path)])

    # Assert
    assert code == 4
    assert _one_error_line(capsys) == (
        f"fedprune-infer: error: {tmp_path}: no model.tflite in this directory"
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"definitely not a flatbuffer", "LiteRT cannot load the model: "),
        (b"", "the model file is empty"),
    ],
)
def test_a_garbled_model_exits_4_with_one_line(
    tmp_path: Path, content: bytes, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    model = tmp_path / "model.tflite"
    model.write_bytes(content)

    # Execute
    code = main([str(model)])

    # Assert
    assert code == 4
    assert _one_error_line(capsys).startswith(f"fedprune-infer: error: {model}: {reason}")


BAD_DATA: dict[str, tuple[bytes | dict[str, np.ndarray] | None, str]] = {
    "missing": (None, "no such data file"),
    "garbled": (b"PK\x03\x04 not really a zip archive", "not a .npz archive"),
    "npy": (b"\x93NUMPY\x01\x00", "not a .npz archive"),
    "no-x": ({"y": np.arange(3)}, "missing array x"),
    "strings": ({"x": np.array([["a"] * 64])}, "features must be finite numbers"),
    "nan": ({"x": np.full((2, 64), np.nan)}, "features must be finite numbers"),
    "one-sample-1d": ({"x": np.zeros(64)}, "x must be a non-empty batch of samples"),
    "wrong-width": ({"x": np.zeros((2, 63))}, "x has 63 values per sample"),
    "y-length": ({"x": np.zeros((2, 64)), "y": np.arange(3)}, "x/y must be"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_exits_2_with_one_line(
    models: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    content, reason = BAD_DATA[kind]
    data = tmp_path / "data.npz"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        np.savez(data, **content)

    # Execute
    code = main([str(models / "float32"), "--data", str(data)])

    # Assert
    line = _one_error_line(capsys)
    assert code == 2
    assert line.startswith(f"fedprune-infer: error: {data}: ")
    assert reason in line


@pytest.mark.slow
def test_inference_runs_with_tensorflow_unimportable(models: Path) -> None:
    # Prepare
    code = textwrap.dedent(
        """
        import sys
        for name in ("tensorflow", "tf_keras", "keras"):
            sys.modules[name] = None  # any import of them now fails
        from fedprune.edge_client.infer import main
        status = main(sys.argv[1:])
        assert not any(sys.modules.get(n) for n in ("tensorflow", "tf_keras", "keras"))
        sys.exit(status)
        """
    )

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", code, str(models / "int8"), "--data", str(models / "digits.npz")]
        + ["--runs", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["accuracy"] > 0.8
