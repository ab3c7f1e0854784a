"""Every precision and the sparse format, exported with ``export_model`` and checked in LiteRT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tf_keras

from fedprune.converters import export_model
from fedprune.converters.report import ExportReport
from fedprune.converters.tflite import parse_precision, to_tflite
from fedprune.device_profiles import DeviceProfile, Precision
from fedprune.edge_client.litert import load_interpreter
from fedprune.protocol.errors import ConfigError, ExportError

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
ProfileFactory = Callable[..., DeviceProfile]
TOLERANCE = 0.01

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exports(
    pruned: tf_keras.Model,
    digits: Digits,
    make_profile: ProfileFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[Precision, ExportReport]:
    """The pruned CNN exported once per precision, dense format, tolerance 0.01."""
    _, _, x, y = digits
    root = tmp_path_factory.mktemp("precisions")
    return {
        precision: export_model(
            pruned,
            make_profile(name=f"p-{precision}", precision=precision, accuracy_tolerance=TOLERANCE),
            x=x,
            y=y,
            out_dir=root / precision.value,
        )
        for precision in Precision
    }


@pytest.mark.parametrize("precision", list(Precision))
def test_each_precision_exports_and_verifies_within_tolerance(
    exports: dict[Precision, ExportReport], precision: Precision
) -> None:
    report = exports[precision]

    assert report.precision is precision
    assert report.keras_accuracy > 0.85
    assert abs(report.tflite_accuracy - report.keras_accuracy) <= TOLERANCE
    assert report.model_path.read_bytes()[4:8] == b"TFL3"


def test_lower_precisions_make_smaller_files(exports: dict[Precision, ExportReport]) -> None:
    size = {p: r.tflite_bytes for p, r in exports.items()}

    assert size[Precision.FLOAT16] < 0.6 * size[Precision.FLOAT32]
    assert size[Precision.DYNAMIC_INT8] < 0.6 * size[Precision.FLOAT16]
    assert size[Precision.FULL_INT8] < 0.7 * size[Precision.FLOAT16]  # + activation scales


def test_full_int8_has_int8_weights_and_a_float32_interface(
    exports: dict[Precision, ExportReport],
) -> None:
    interpreter = load_interpreter(exports[Precision.FULL_INT8].model_path)

    dtypes = {np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    assert np.dtype(np.int8) in dtypes
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert interpreter.get_output_details()[0]["dtype"] == np.float32


def test_sparse_format_is_kept_when_it_makes_the_file_smaller(
    pruned: tf_keras.Model, digits: Digits, make_profile: ProfileFactory, tmp_path: Path
) -> None:
    _, _, x, y = digits
    profile = make_profile(name="sparse-f32", sparse_format=True)

    report = export_model(pruned, profile, x=x, y=y, out_dir=tmp_path)

    assert report.sparse_format is True
    assert report.sparse_format_bytes is not None
    assert report.tflite_bytes == report.sparse_format_bytes < report.dense_format_bytes
    assert report.tflite_bytes == report.model_path.stat().st_size
    assert report.tflite_accuracy == pytest.approx(report.keras_accuracy, abs=0.005)


def test_sparse_format_is_dropped_when_it_does_not_make_the_file_smaller(
    dense: tf_keras.Model, digits: Digits, make_profile: ProfileFactory, tmp_path: Path
) -> None:
    _, _, x, y = digits
    profile = make_profile(name="sparse-dense-model", sparse_format=True)

    report = export_model(dense, profile, x=x, y=y, out_dir=tmp_path)

    assert report.weight_sparsity < 0.01
    assert report.sparse_format is False
    assert report.sparse_format_bytes is not None
    assert report.tflite_bytes == report.dense_format_bytes <= report.sparse_format_bytes


@pytest.fixture(scope="module")
def fragile(digits: Digits) -> tf_keras.Model:
    """A 64-128-10 MLP with a huge first-layer weight on pixel 0, which is zero in every image.

    Keras never sees the huge weight; int8 quantization scales each hidden unit's weights by it
    and rounds every useful weight to zero, so the int8 model really loses its accuracy. (The
    converter leaves tensors under 1,024 values in float, hence a layer of 8,192.)
    """
    x_train, y_train, x_test, _ = digits
    assert not np.any(x_train[:, 0, 0, 0]) and not np.any(x_test[:, 0, 0, 0])
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((8, 8, 1)),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(128, activation="relu"),
            tf_keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=5, batch_size=32, verbose=0)
    hidden = model.layers[1]
    kernel, bias = hidden.get_weights()
    kernel[0, :] = 1000.0
    hidden.set_weights([kernel, bias])
    return model


def test_export_losing_more_than_the_tolerance_is_refused_and_nothing_written(
    fragile: tf_keras.Model, digits: Digits, make_profile: ProfileFactory, tmp_path: Path
) -> None:
    _, _, x, y = digits
    profile = make_profile(name="int8-board", precision="dynamic_int8", accuracy_tolerance=0.02)

    with pytest.raises(ExportError) as caught:
        export_model(fragile, profile, x=x, y=y, out_dir=tmp_path / "out")

    message = str(caught.value)
    assert message.startswith("profile int8-board: LiteRT accuracy 0.")
    assert "minus accuracy_tolerance 0.02) on 450 samples; nothing written" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_same_fragile_model_passes_in_float16_and_with_a_looser_override(
    fragile: tf_keras.Model, digits: Digits, make_profile: ProfileFactory, tmp_path: Path
) -> None:
    _, _, x, y = digits
    strict = make_profile(name="strict", precision="float16", accuracy_tolerance=0.0)
    int8 = make_profile(name="int8", precision="dynamic_int8", accuracy_tolerance=0.0)

    float16 = export_model(fragile, strict, x=x, y=y, out_dir=tmp_path / "f16")
    loose = export_model(fragile, int8, x=x, y=y, out_dir=tmp_path / "i8", max_accuracy_drop=1.0)

    assert float16.keras_accuracy > 0.85
    assert float16.tflite_accuracy >= float16.keras_accuracy
    assert loose.tflite_accuracy < loose.keras_accuracy - 0.5
    assert (tmp_path / "i8" / "export.json").is_file()


def test_full_int8_uses_the_given_calibration_samples(
    pruned: tf_keras.Model, digits: Digits, make_profile: ProfileFactory, tmp_path: Path
) -> None:
    _, _, x, y = digits
    profile = make_profile(name="full", precision="full_int8", accuracy_tolerance=0.05)
    blank = np.zeros((50, 8, 8, 1), np.float32)  # calibrates every activation range to [0, 0]

    with pytest.raises(ExportError, match="LiteRT accuracy"):
        export_model(pruned, profile, x=x, y=y, calibration=blank, out_dir=tmp_path / "out")

    assert not (tmp_path / "out").exists()


def test_full_int8_without_calibration_samples_is_a_config_error(
    pruned: tf_keras.Model,
) -> None:
    with pytest.raises(ConfigError, match="full_int8 export needs calibration samples"):
        to_tflite(pruned, precision=Precision.FULL_INT8)


def test_parse_precision_returns_the_device_profiles_enum() -> None:
    assert parse_precision("float16") is Precision.FLOAT16
    with pytest.raises(ConfigError, match="unknown precision 'int4' .*float32, float16"):
        parse_precision("int4")
