"""The held-out evaluation set a run ships with: ``heldout.npz`` holding ``x`` and ``y``."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters._errors import short_reason
from edge_client.errors import ConfigError


@dataclass(frozen=True)
class HeldOut:
    """Inputs ``x`` (float32, one row per sample) and integer labels ``y`` read from ``path``."""

    path: Path
    x: np.ndarray
    y: np.ndarray

    def check_input_shape(self, sample_shape: tuple[int | None, ...]) -> None:
        """Raise ConfigError unless one row of ``x`` fits a model input of ``sample_shape``."""
        fits = len(sample_shape) == self.x.ndim - 1 and all(
            want is None or want == got
            for want, got in zip(sample_shape, self.x.shape[1:], strict=True)
        )
        if not fits:
            raise ConfigError(
                f"{self.path}: x has samples of shape {self.x.shape[1:]}, "
                f"the model expects {tuple(sample_shape)}"
            )


def load_heldout(path: Path) -> HeldOut:
    """Read and validate ``x`` and ``y`` from an ``.npz`` file; problems are ConfigErrors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: held-out data file not found")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: not an .npz archive ({short_reason(exc)})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ConfigError(f"{path}: not an .npz archive (a single .npy array)")
    with data:
        missing = [key for key in ("x", "y") if key not in data.files]
        if missing:
            found = ", ".join(data.files) or "none"
            raise ConfigError(f"{path}: no array {' or '.join(missing)} (found: {found})")
        try:
            x, y = data["x"], data["y"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{path}: unreadable array ({short_reason(exc)})") from exc
    return _validated(path, x, y)


def _validated(path: Path, x: np.ndarray, y: np.ndarray) -> HeldOut:
    if x.ndim < 2 or len(x) == 0:
        raise ConfigError(f"{path}: x must hold at least one sample, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.integer)):
        raise ConfigError(f"{path}: x must be numeric and y integer, got {x.dtype} and {y.dtype}")
    if y.reshape(-1).shape != (len(x),):
        raise ConfigError(f"{path}: y has shape {y.shape}, expected ({len(x)},) labels")
    return HeldOut(path, x.astype(np.float32, copy=False), y.reshape(-1))
