"""Loading a device's local data file: the holdout split and one-line errors for bad files."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedprune.edge_client.data import LocalData, load
from fedprune.protocol.errors import ConfigError


def _samples(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of 3 features; the first is the sample's number, so rows can be traced."""
    x = np.stack([np.arange(n), np.full(n, 0.5), np.full(n, -1.0)], axis=1).astype(np.float64)
    y = (np.arange(n) % 4).astype(np.int32)
    return x, y


def test_a_file_without_a_test_split_holds_out_a_disjoint_20_percent(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "kitchen.npz"
    x, y = _samples(50)
    np.savez(path, x=x, y=y)

    # Execute
    data = load(path, seed=7)

    # Assert
    train_ids, test_ids = set(data.x[:, 0].astype(int)), set(data.x_test[:, 0].astype(int))
    assert (len(data.x), len(data.x_test)) == (40, 10)
    assert train_ids.isdisjoint(test_ids)
    assert train_ids | test_ids == set(range(50))
    np.testing.assert_array_equal(data.y, data.x[:, 0].astype(int) % 4)  # labels follow rows
    assert data.num_samples == 40
    assert (data.x.dtype, data.y.dtype) == (np.dtype(np.float32), np.dtype(np.int64))


def test_the_holdout_split_is_seeded(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "kitchen.npz"
    x, y = _samples(50)
    np.savez(path, x=x, y=y)

    # Execute
    first, again, other = load(path, seed=7), load(path, seed=7), load(path, seed=8)

    # Assert
    np.testing.assert_array_equal(first.x_test, again.x_test)
    assert set(first.x_test[:, 0]) != set(other.x_test[:, 0])


def test_a_file_with_its_own_test_split_keeps_all_training_samples(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "garage.npz"
    x, y = _samples(30)
    x_test, y_test = _samples(6)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)

    # Execute
    data = load(path)

    # Assert
    np.testing.assert_array_equal(data.x, x.astype(np.float32))
    np.testing.assert_array_equal(data.y, y)
    np.testing.assert_array_equal(data.x_test, x_test.astype(np.float32))
    np.testing.assert_array_equal(data.y_test, y_test)
    assert data.num_samples == 30


def test_shaped_reshapes_features_to_the_model_input() -> None:
    # Prepare
    data = LocalData(
        x=np.zeros((4, 6), np.float32),
        y=np.zeros(4, np.int64),
        x_test=np.zeros((2, 6), np.float32),
        y_test=np.zeros(2, np.int64),
    )

    # Execute
    x, x_test = data.shaped([2, 3])

    # Assert
    assert (x.shape, x_test.shape) == ((4, 2, 3), (2, 2, 3))
    with pytest.raises(ConfigError, match=r"6 features per sample; the model wants \[28, 28, 1\]"):
        data.shaped([28, 28, 1])


def _text_file(path: Path) -> None:
    path.write_text("x,y\n1,2\n")


def _npy_file(path: Path) -> None:
    with path.open("wb") as f:
        np.save(f, np.zeros((5, 3)))


def _truncated_npz(path: Path) -> None:
    x, y = _samples(20)
    np.savez(path, x=x, y=y)
    path.write_bytes(path.read_bytes()[:100])


def _without_y(path: Path) -> None:
    np.savez(path, x=_samples(10)[0])


def _mismatched_lengths(path: Path) -> None:
    np.savez(path, x=_samples(10)[0], y=_samples(9)[1])


def _float_labels(path: Path) -> None:
    x, y = _samples(10)
    np.savez(path, x=x, y=y.astype(np.float64))


def _one_hot_labels(path: Path) -> None:
    x, y = _samples(10)
    np.savez(path, x=x, y=np.eye(4, dtype=np.float32)[y % 4])


def _nan_features(path: Path) -> None:
    x, y = _samples(10)
    x[3, 1] = np.nan
    np.savez(path, x=x, y=y)


def _bad_test_split(path: Path) -> None:
    x, y = _samples(10)
    np.savez(path, x=x, y=y, x_test=x[:3], y_test=y[:2])


@pytest.mark.parametrize(
    ("write", "fragment"),
    [
        (None, "no such data file"),
        (_text_file, r"not a \.npz archive"),
        (_npy_file, r"not a \.npz archive"),
        (_truncated_npz, r"not a \.npz archive"),
        (_without_y, r"missing array\(s\) y; need x and y"),
        (_mismatched_lengths, r"got shapes \(10, 3\) and \(9,\)"),
        (_float_labels, r"labels must be integer class numbers, got float64 \(y.astype"),
        (_one_hot_labels, r"labels of shape \(10, 4\) look one-hot encoded; .* y.argmax\(axis=1\)"),
        (_nan_features, "features must be finite numbers"),
        (_bad_test_split, r"x_test/y_test must be .* got shapes \(3, 3\) and \(2,\)"),
    ],
    ids=[
        "missing",
        "text",
        "npy",
        "truncated",
        "no-y",
        "lengths",
        "float-labels",
        "one-hot-labels",
        "nan",
        "test-split",
    ],
)
def test_a_bad_data_file_is_one_config_error_line_naming_the_file(
    tmp_path: Path, write: Callable[[Path], None] | None, fragment: str
) -> None:
    # Prepare
    path = tmp_path / "device.npz"
    if write is not None:
        write(path)

    # Execute
    with pytest.raises(ConfigError) as caught:
        load(path)

    # Assert
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert re.search(fragment, message), message
