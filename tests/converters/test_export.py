"""Export of a pruned digits classifier to TFLite, verified under LiteRT."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot
import tf_keras
from sklearn.datasets import load_digits

from converters import export_run, load_keras
from converters.cli import main
from converters.strip import strip
from edge_client.errors import ConfigError, ExportError

SPARSITY = 0.8


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, test = order[:1347], order[1347:]
    return x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64)


def _pruned_model(x: np.ndarray, y: np.ndarray) -> tf_keras.Model:
    """A small CNN trained briefly, then fine-tuned under an 80% constant-sparsity mask."""
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((8, 8, 1)),
            tf_keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    schedule = tfmot.sparsity.keras.ConstantSparsity(SPARSITY, begin_step=0, frequency=1)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    wrapped.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep()]
    wrapped.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
    return wrapped


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved files shared by the tests: wrapped and stripped models and the held-out set."""
    x_train, y_train, x_test, y_test = _digits()
    wrapped = _pruned_model(x_train, y_train)
    root = tmp_path_factory.mktemp("trained")
    wrapped.save(root / "wrapped.keras")
    strip(wrapped).save(root / "stripped.keras")
    np.savez(root / "heldout.npz", x=x_test, y=y_test)
    return {name: root / name for name in ("wrapped.keras", "stripped.keras", "heldout.npz")}


def _run_dir(tmp_path: Path, trained: dict[str, Path], model: str = "stripped.keras") -> Path:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / model).write_bytes(trained[model].read_bytes())
    (run / "heldout.npz").write_bytes(trained["heldout.npz"].read_bytes())
    return run


@pytest.mark.slow
def test_export_run_writes_tflite_and_report(tmp_path: Path, trained: dict[str, Path]) -> None:
    run = _run_dir(tmp_path, trained)

    report = export_run(run, profile="rpi4-64")

    out = run / "export" / "rpi4-64"
    assert report.model_path == out / "model.tflite"
    assert (out / "model.tflite").read_bytes()[4:8] == b"TFL3"
    saved = json.loads((out / "export.json").read_text())
    assert saved["profile"] == "rpi4-64"
    assert saved["precision"] == "float32"
    assert saved["tflite_bytes"] == (out / "model.tflite").stat().st_size
    assert saved["n_eval"] == 450
    assert saved["run_dir"] == str(run)
    assert saved["keras_accuracy"] == report.keras_accuracy
    assert sorted(saved) == sorted(
        ["profile", "precision", "model_path", "tflite_bytes", "gzip_bytes", "keras_accuracy",
         "tflite_accuracy", "n_eval", "weight_sparsity", "run_dir", "data", "created"]
    )  # fmt: skip


@pytest.mark.slow
def test_litert_accuracy_matches_keras(tmp_path: Path, trained: dict[str, Path]) -> None:
    report = export_run(_run_dir(tmp_path, trained))

    assert report.keras_accuracy > 0.85
    assert abs(report.tflite_accuracy - report.keras_accuracy) <= 0.01


@pytest.mark.slow
def test_pruned_model_gzips_much_smaller(tmp_path: Path, trained: dict[str, Path]) -> None:
    report = export_run(_run_dir(tmp_path, trained))

    assert report.weight_sparsity == pytest.approx(SPARSITY, abs=0.02)
    assert report.gzip_bytes < 0.5 * report.tflite_bytes


@pytest.mark.slow
def test_wrapped_model_is_stripped_when_no_stripped_file(
    tmp_path: Path, trained: dict[str, Path]
) -> None:
    run = _run_dir(tmp_path, trained, model="wrapped.keras")

    report = export_run(run)

    assert report.weight_sparsity == pytest.approx(SPARSITY, abs=0.02)
    assert (run / "export" / "generic-x86-64" / "model.tflite").is_file()


@pytest.mark.slow
def test_accuracy_drop_raises_and_writes_nothing(
    tmp_path: Path, trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_dir(tmp_path, trained)
    monkeypatch.setattr("converters.export.evaluate_tflite", lambda *args, **kwargs: 0.5)

    with pytest.raises(ExportError, match="TFLite accuracy 0.5000"):
        export_run(run)

    assert not (run / "export").exists()


def _write_npz_without_y(path: Path) -> None:
    np.savez(path, x=np.zeros((3, 8, 8, 1), np.float32))


def _write_npy_named_npz(path: Path) -> None:
    with path.open("wb") as f:
        np.save(f, np.zeros(3))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("writer", "reason"),
    [
        (None, "not found"),
        (lambda p: p.write_bytes(b"not a zip archive"), "not an .npz archive"),
        (_write_npy_named_npz, "not an .npz archive"),
        (_write_npz_without_y, "no array y"),
        (lambda p: np.savez(p, x=np.zeros((3, 4, 4, 1)), y=np.zeros(3, int)), "model expects"),
    ],
    ids=["missing", "garbage", "npy", "no-y", "wrong-shape"],
)  # fmt: skip
def test_bad_data_file_raises_config_error(
    tmp_path: Path, trained: dict[str, Path], writer: Callable[[Path], object] | None, reason: str
) -> None:
    run = _run_dir(tmp_path, trained)
    data = tmp_path / "bad.npz"
    if writer is not None:
        writer(data)

    with pytest.raises(ConfigError, match=reason) as caught:
        export_run(run, data=data)

    assert str(data) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (run / "export").exists()


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


def test_cli_missing_run_dir_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(tmp_path / "nowhere")])

    err = capsys.readouterr().err
    assert code == ConfigError.exit_code
    assert err.count("\n") == 1
    assert err.startswith("fedprune-export: error: ")
    assert "nowhere" in err


@pytest.mark.slow
def test_cli_prints_summary(
    tmp_path: Path, trained: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path, trained)

    code = main([str(run), "--profile", "rpi5"])

    out = capsys.readouterr().out
    assert code == 0
    assert str(run / "export" / "rpi5" / "model.tflite") in out
    assert "keras" in out and "tflite" in out
