"""Every export runs in LiteRT's default interpreter, the one a user's own code creates.

Issue 8 (A): a sparse-format int8 file that XNNPACK (the default delegate) cannot prepare crashed
``Interpreter(model_path=...)`` on the device it was made for. Exports are now verified in that
interpreter; a device still opens such an older file, on builtin kernels, and says so.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tf_keras
from ai_edge_litert.interpreter import Interpreter

from fedprune.converters import ExportReport, export_model, export_profiles
from fedprune.converters.export import ExportResult
from fedprune.converters.report import REPORT_FILE
from fedprune.converters.tflite import to_tflite
from fedprune.device_profiles import DeviceProfile, Precision, available
from fedprune.device_profiles import load as load_profile
from fedprune.edge_client.infer import main as infer_main
from fedprune.edge_client.litert import Runtime, open_model, predict
from fedprune.protocol.errors import ModelError

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
DEFAULT_RUNTIME = "default interpreter (XNNPACK)"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def all_profiles(
    trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, ExportResult]]:
    """One run directory (the 80%-pruned CNN) exported once for every shipped profile."""
    run = tmp_path_factory.mktemp("all-profiles")
    (run / "model").mkdir()
    shutil.copy(trained["stripped.keras"], run / "model" / "stripped.keras")
    shutil.copy(trained["heldout.npz"], run / "heldout.npz")
    results = export_profiles(run, available())
    return run, dict(zip(available(), results, strict=True))


@pytest.mark.parametrize("profile", available())
def test_every_shipped_profile_export_runs_in_a_plain_default_interpreter(
    all_profiles: tuple[Path, dict[str, ExportResult]], digits: Digits, profile: str
) -> None:
    # Prepare
    run, results = all_profiles
    _, _, x, y = digits
    assert isinstance(results[profile], ExportReport), results[profile]
    path = run / "export" / profile / "model.tflite"

    # Execute: what a user's own code on the device does, and nothing else
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x[:1])
    interpreter.invoke()
    row = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    # Assert: one probability per class, and the right class for this sample
    assert row.shape == (1, 10)
    assert row.dtype == np.float32
    assert np.all(row >= 0.0)
    assert float(row.sum()) == pytest.approx(1.0, abs=0.02)
    assert int(np.argmax(row)) == int(y[0])


@pytest.mark.parametrize("profile", available())
def test_export_json_says_the_file_needs_the_default_interpreter_and_why_sparse_was_dropped(
    all_profiles: tuple[Path, dict[str, ExportResult]], profile: str
) -> None:
    # Prepare
    run, _ = all_profiles
    asked_sparse = load_profile(profile).sparse_format

    # Execute
    saved = json.loads((run / "export" / profile / REPORT_FILE).read_text())

    # Assert
    assert saved["runtime"] == DEFAULT_RUNTIME
    assert saved["input"]["dtype"] == saved["output"]["dtype"] == "float32"
    if not asked_sparse:
        assert (saved["sparse_format_bytes"], saved["sparse_format_rejected"]) == (None, None)
    elif saved["sparse_format"]:
        assert saved["sparse_format_rejected"] is None
        assert saved["tflite_bytes"] == saved["sparse_format_bytes"] < saved["dense_format_bytes"]
    else:
        assert saved["tflite_bytes"] == saved["dense_format_bytes"]
        assert isinstance(saved["sparse_format_rejected"], str)
        assert saved["sparse_format_rejected"]


def test_raspberry_pi_sparse_int8_files_are_dropped_because_xnnpack_cannot_prepare_them(
    all_profiles: tuple[Path, dict[str, ExportResult]],
) -> None:
    # Prepare: the Raspberry Pi profiles ask for the sparse format on int8 precisions
    _, results = all_profiles
    pis = [name for name in available() if name.startswith("raspberry-pi")]

    # Execute
    reports = [results[name] for name in pis]

    # Assert: smaller, but not runnable in the default interpreter with this LiteRT, so dense kept
    assert len(reports) == 4
    for report in reports:
        assert isinstance(report, ExportReport)
        assert report.precision in (Precision.DYNAMIC_INT8, Precision.FULL_INT8)
        assert report.sparse_format_bytes is not None
        assert report.sparse_format_bytes < report.dense_format_bytes == report.tflite_bytes
        assert report.sparse_format is False
        assert report.sparse_format_rejected is not None
        assert report.sparse_format_rejected.startswith(
            "LiteRT's default interpreter (XNNPACK) cannot prepare the model: failed to delegate "
        )


@pytest.fixture
def old_sparse_export(pruned: tf_keras.Model, tmp_path: Path) -> Path:
    """A sparse-format dynamic-int8 file, as fedprune exported for the Pis before issue 8."""
    path = tmp_path / "old" / "model.tflite"
    path.parent.mkdir()
    path.write_bytes(to_tflite(pruned, precision=Precision.DYNAMIC_INT8, sparse=True))
    try:
        open_model(path, runtime=Runtime.DEFAULT)
    except ModelError:
        return path
    pytest.skip("this LiteRT's XNNPACK prepares sparse int8 models: nothing to fall back from")


def test_device_opens_a_file_xnnpack_cannot_prepare_on_builtin_kernels_and_says_why(
    old_sparse_export: Path, digits: Digits
) -> None:
    # Prepare
    _, _, x, y = digits

    # Execute
    loaded = open_model(old_sparse_export)
    scores = predict(loaded.interpreter, x)

    # Assert
    assert loaded.runtime is Runtime.BUILTIN
    assert loaded.fallback is not None and loaded.fallback.startswith("failed to delegate ")
    assert loaded.describe().startswith(
        "builtin kernels (no delegates); the default interpreter failed: failed to delegate "
    )
    assert float(np.mean(np.argmax(scores, axis=1) == y)) > 0.85


def test_verification_runtime_refuses_a_file_xnnpack_cannot_prepare(
    old_sparse_export: Path,
) -> None:
    # Execute
    with pytest.raises(ModelError) as caught:
        open_model(old_sparse_export, runtime=Runtime.DEFAULT)

    # Assert
    message = str(caught.value)
    assert message.startswith(
        "LiteRT's default interpreter (XNNPACK) cannot prepare the model: failed to delegate "
    )
    assert "\n" not in message


def test_fedprune_infer_reports_the_runtime_it_fell_back_to(
    old_sparse_export: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = infer_main([str(old_sparse_export), "--runs", "2", "--threads", "1", "--json"])

    # Assert
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["runtime"].startswith(
        "builtin kernels (no delegates); the default interpreter failed: failed to delegate "
    )
    assert report["runs"] == 2


def test_a_new_export_of_a_sparse_int8_profile_opens_in_the_default_interpreter_on_device(
    pruned: tf_keras.Model,
    digits: Digits,
    make_profile: Callable[..., DeviceProfile],
    tmp_path: Path,
) -> None:
    # Prepare
    _, _, x, y = digits
    profile = make_profile(name="pi-like", precision="dynamic_int8", sparse_format=True)

    # Execute
    report = export_model(pruned, profile, x=x, y=y, out_dir=tmp_path)
    loaded = open_model(report.model_path)

    # Assert: the device's own loader takes the default interpreter, with no fallback
    assert (loaded.runtime, loaded.fallback) == (Runtime.DEFAULT, None)
    assert loaded.describe() == DEFAULT_RUNTIME
