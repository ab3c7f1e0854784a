"""A device's local data: a ``.npz`` file with arrays ``x`` (features) and ``y`` (integer labels).

Optional ``x_test``/``y_test`` arrays are the device's held-out split; without them the client holds
out a seeded 20% of ``x``/``y``. Features are reshaped to the model's input shape when training.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.npyio import NpzFile

from fedprune.protocol.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class LocalData:
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def shaped(self, input_shape: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Training and held-out features reshaped to ``input_shape`` (without the batch axis)."""
        shape = (-1, *input_shape)
        try:
            return self.x.reshape(shape), self.x_test.reshape(shape)
        except ValueError as exc:
            per_sample = int(np.prod(self.x.shape[1:]))
            raise ConfigError(
                f"local data has {per_sample} features per sample; the model wants {input_shape}"
            ) from exc


def check_features(path: Path, x: np.ndarray, name: str = "x") -> np.ndarray:
    """A non-empty batch of finite numbers, as float32."""
    if x.ndim < 2 or len(x) == 0:
        raise ConfigError(
            f"{path}: {name} must be a non-empty batch of samples, got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise ConfigError(f"{path}: features must be finite numbers")
    return x.astype(np.float32)


def check_labelled(
    path: Path, x: np.ndarray, y: np.ndarray, names: str = "x/y"
) -> tuple[np.ndarray, np.ndarray]:
    """Features plus one integer label per sample."""
    if y.ndim == 2 and len(y) == len(x) and y.shape[1] > 1:
        raise ConfigError(
            f"{path}: labels of shape {y.shape} look one-hot encoded; fedprune needs one integer"
            f" class per sample (for one-hot labels: y = y.argmax(axis=1))"
        )
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(
            f"{path}: {names} must be a non-empty batch of samples and a 1-D label array of the"
            f" same length, got shapes {x.shape} and {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"{path}: labels must be integer class numbers, got {y.dtype} (y.astype('int64')"
            " converts whole numbers)"
        )
    return check_features(path, x), y.astype(np.int64)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a ``.npz`` file (never unpickled); problems are one ``ConfigError`` line."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, NpzFile):  # a .npy file: one bare array, not x and y
            raise ConfigError(f"{path}: not a .npz archive (numpy.savez writes one)")
        with loaded as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such data file") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if not zipfile.is_zipfile(path):  # numpy's own message would talk about pickles
            raise ConfigError(f"{path}: not a .npz archive (numpy.savez writes one)") from exc
        raise ConfigError(f"{path}: not a readable .npz data file ({exc})") from exc


def load(path: Path, *, seed: int = 0, holdout: float = 0.2) -> LocalData:
    """Load and validate a local data file; every problem is one ``ConfigError`` line."""
    arrays = read_npz(path)
    missing = {"x", "y"} - arrays.keys()
    if missing:
        raise ConfigError(f"{path}: missing array(s) {', '.join(sorted(missing))}; need x and y")
    x, y = check_labelled(path, arrays["x"], arrays["y"])
    if "x_test" in arrays and "y_test" in arrays:
        x_test, y_test = check_labelled(path, arrays["x_test"], arrays["y_test"], "x_test/y_test")
        return LocalData(x=x, y=y, x_test=x_test, y_test=y_test)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * holdout)) if len(y) >= 5 else 0
    test, train = order[:n_test], order[n_test:]
    return LocalData(x=x[train], y=y[train], x_test=x[test], y_test=y[test])
