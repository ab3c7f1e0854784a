"""Full int8's input and output: float32 by default, int8 on request, and export.json says which.

Issue 8 (D): a full int8 export keeps a float32 input and output (a quantize op in front, a
dequantize op behind); ``int8_io`` / ``fedprune-export --int8-io`` drops them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tf_keras
from ai_edge_litert.interpreter import Interpreter

from fedprune.converters import ExportReport, export_model
from fedprune.converters.cli import main as export_main
from fedprune.converters.report import REPORT_FILE
from fedprune.device_profiles import DeviceProfile
from fedprune.edge_client.infer import main as infer_main
from fedprune.edge_client.litert import TensorFormat
from fedprune.protocol.errors import ConfigError

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
ProfileFactory = Callable[..., DeviceProfile]
RunFactory = Callable[..., Path]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_int8(
    pruned: tf_keras.Model,
    digits: Digits,
    make_profile: ProfileFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[bool, ExportReport]:
    """The pruned CNN exported in full int8, with float32 I/O (False) and int8 I/O (True)."""
    _, _, x, y = digits
    profile = make_profile(name="full", precision="full_int8", accuracy_tolerance=0.02)
    root = tmp_path_factory.mktemp("int8-io")
    return {
        int8_io: export_model(
            pruned, profile, x=x, y=y, out_dir=root / str(int8_io), int8_io=int8_io
        )
        for int8_io in (False, True)
    }


def test_full_int8_export_says_its_input_and_output_are_float32(
    full_int8: dict[bool, ExportReport],
) -> None:
    # Prepare
    report = full_int8[False]

    # Execute
    saved = json.loads((report.model_path.parent / REPORT_FILE).read_text())

    # Assert
    assert report.input == TensorFormat(dtype="float32", shape=(8, 8, 1))
    assert report.output == TensorFormat(dtype="float32", shape=(10,))
    assert (saved["input"], saved["output"]) == (
        {"dtype": "float32", "shape": [8, 8, 1]},
        {"dtype": "float32", "shape": [10]},
    )
    assert report.int8_io is False


def test_int8_io_export_records_the_quantization_a_caller_needs(
    full_int8: dict[bool, ExportReport],
) -> None:
    # Prepare
    report = full_int8[True]

    # Execute
    saved = json.loads((report.model_path.parent / REPORT_FILE).read_text())

    # Assert
    assert report.int8_io is True
    assert report.input.dtype == report.output.dtype == "int8"
    assert (report.input.shape, report.output.shape) == ((8, 8, 1), (10,))
    assert report.input.scale is not None and report.input.scale > 0
    assert report.output.scale == pytest.approx(1 / 256)  # softmax output, int8 over [0, 1]
    assert report.output.zero_point == -128
    assert saved["input"] == {
        "dtype": "int8",
        "shape": [8, 8, 1],
        "scale": report.input.scale,
        "zero_point": report.input.zero_point,
    }
    assert report.tflite_bytes < full_int8[False].tflite_bytes  # no quantize/dequantize ops


def test_int8_io_file_run_by_hand_with_the_recorded_scales_matches_the_report(
    full_int8: dict[bool, ExportReport], digits: Digits
) -> None:
    # Prepare: quantize the scored held-out rows by hand with export.json's numbers
    report = full_int8[True]
    saved = json.loads((report.model_path.parent / REPORT_FILE).read_text())
    _, _, x, y = digits
    inp, out = saved["input"], saved["output"]
    q = np.clip(np.round(x / inp["scale"] + inp["zero_point"]), -128, 127).astype(np.int8)

    # Execute: a plain default interpreter, one sample at a time
    interpreter = Interpreter(model_path=str(report.model_path))
    interpreter.allocate_tensors()
    scores = []
    for row in q:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], row[np.newaxis])
        interpreter.invoke()
        raw = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        scores.append((raw.astype(np.float32) - out["zero_point"]) * out["scale"])

    # Assert: the same accuracy as the float-I/O file, row sums of about 1
    probabilities = np.concatenate(scores)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=0.05)
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == y))
    assert accuracy == pytest.approx(full_int8[False].tflite_accuracy, abs=0.02)


def test_int8_io_for_a_profile_that_is_not_full_int8_is_a_config_error(
    pruned: tf_keras.Model, digits: Digits, make_profile: ProfileFactory, tmp_path: Path
) -> None:
    # Prepare
    _, _, x, y = digits
    profile = make_profile(name="float-board", precision="float32")

    # Execute
    with pytest.raises(ConfigError) as caught:
        export_model(pruned, profile, x=x, y=y, out_dir=tmp_path / "out", int8_io=True)

    # Assert
    assert str(caught.value) == (
        "profile float-board: int8 input and output need precision full_int8, not float32"
    )
    assert not (tmp_path / "out").exists()


def test_int8_io_flag_changes_full_int8_profiles_only(
    make_run: RunFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run = make_run()

    # Execute
    code = export_main([str(run), "--profile", "raspberry-pi-3b", "generic-x86-64", "--int8-io"])

    # Assert
    out = capsys.readouterr().out.splitlines()
    dtypes = {
        name: json.loads((run / "export" / name / REPORT_FILE).read_text())["input"]["dtype"]
        for name in ("raspberry-pi-3b", "generic-x86-64")
    }
    assert code == 0
    assert out[0].startswith("raspberry-pi-3b  full_int8+int8io ")
    assert out[1].startswith("generic-x86-64   float32 ")
    assert dtypes == {"raspberry-pi-3b": "int8", "generic-x86-64": "float32"}


def test_int8_io_flag_without_a_full_int8_profile_is_one_error_line_and_exit_2(
    make_run: RunFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run = make_run()

    # Execute
    code = export_main([str(run), "--profile", "raspberry-pi-4", "--int8-io"])

    # Assert
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err == (
        "fedprune-export: error: int8 input and output need a full_int8 profile; "
        "none of raspberry-pi-4 is\n"
    )
    assert not (run / "export").exists()


def test_fedprune_infer_feeds_an_int8_io_export_and_describes_its_input(
    full_int8: dict[bool, ExportReport],
    digits: Digits,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    report = full_int8[True]
    _, _, x, y = digits
    np.savez(tmp_path / "digits.npz", x=x, y=y)

    # Execute
    code = infer_main(
        [str(report.model_path.parent), "--data", str(tmp_path / "digits.npz"), "--runs", "2"]
    )

    # Assert
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines()}
    assert code == 0
    assert lines["input"] == (
        f"int8 (N, 8, 8, 1), scale {report.input.scale:.6g} zero point {report.input.zero_point}"
    )
    assert lines["runtime"] == "default interpreter (XNNPACK)"
    assert float(lines["accuracy"].split()[0]) >= report.tflite_accuracy - 0.02
