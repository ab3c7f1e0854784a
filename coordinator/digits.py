"""The demo's data: scikit-learn's 8x8 digits (shipped with it), split non-IID by Dirichlet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fedprune.protocol.errors import ConfigError


def load() -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 8, 8, 1) in [0, 1] and int64 labels."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    return x, digits.target.astype(np.int64)


def dirichlet_split(
    y: np.ndarray, n_clients: int, *, alpha: float, seed: int, min_size: int = 20
) -> list[np.ndarray]:
    """Indices per client: each class is shared out by proportions drawn from Dirichlet(alpha).

    Smaller ``alpha`` means more skewed clients. Draws again until every client has ``min_size``.
    """
    if n_clients < 1 or alpha <= 0:
        raise ConfigError(f"need n_clients >= 1 and alpha > 0, got {n_clients} and {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for label in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients)) * len(idx)).astype(int)[:-1]
            for part, share in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(share.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"cannot give {n_clients} clients {min_size} samples each at alpha={alpha}")


NORMAL_DIGITS = (0, 1, 2, 3, 4)
"""The normal classes of the anomaly-detection proxy: an autoencoder learns to reconstruct these
digits on the devices, and the held-out 5-9 are the anomalies its error should find."""


def write_demo_data(
    folder: Path,
    n_clients: int,
    *,
    alpha: float,
    seed: int,
    test_fraction: float = 0.25,
    normal: tuple[int, ...] | None = None,
    min_size: int = 20,
) -> tuple[list[Path], Path]:
    """One .npz per client (x, y and its own held-out x_test, y_test) plus the coordinator's;
    each client gets at least ``min_size`` samples (dirichlet_split).

    With ``normal`` classes (anomaly detection), the clients get only those, and the held-out
    set keeps every class, labelled 0 (normal) or 1 (an anomaly)."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = load()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    if normal is not None:
        kept = np.isin(y_train, normal)
        x_train, y_train = x_train[kept], y_train[kept]
        y_test = (~np.isin(y_test, normal)).astype(np.int64)
    heldout = folder / "heldout.npz"
    np.savez(heldout, x=x_test, y=y_test)
    paths = []
    for i, idx in enumerate(
        dirichlet_split(y_train, n_clients, alpha=alpha, seed=seed, min_size=min_size)
    ):
        cut = max(1, len(idx) // 5)
        rng = np.random.default_rng(seed + i)
        idx = rng.permutation(idx)
        path = folder / f"client-{i}.npz"
        np.savez(
            path,
            x=x_train[idx[cut:]],
            y=y_train[idx[cut:]],
            x_test=x_train[idx[:cut]],
            y_test=y_train[idx[:cut]],
        )
        paths.append(path)
    return paths, heldout
