"""The run directory: config.toml, metrics.jsonl, devices.json, checkpoints/, model/, heldout.npz,
export/."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.ledger import Ledger
from fedprune.coordinator.pruning import Pruner
from fedprune.coordinator.rounds import RoundResult
from fedprune.edge_client.errors import ConfigError
from fedprune.edge_client.files import write_atomic
from fedprune.edge_client.telemetry import as_json


def _atomic(path: Path, write: Any) -> None:
    """Render with ``write(file)`` into memory, then replace ``path`` in one step."""
    buffer = io.BytesIO()
    write(buffer)
    write_atomic(path, buffer.getvalue())


class RunDir:
    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.path = path
        self.metrics = path / "metrics.jsonl"
        if self.metrics.exists() and self.metrics.stat().st_size and not overwrite:
            raise ConfigError(
                f"{path} holds an earlier run; choose another --run name or pass --overwrite"
            )
        if overwrite:
            shutil.rmtree(path / "export", ignore_errors=True)
        for sub in ("checkpoints", "model"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        self.metrics.write_text("")

    def write_config(self, config: RunConfig) -> None:
        data = {k: v for k, v in config.to_dict().items() if v is not None}
        _atomic(self.path / "config.toml", lambda f: tomli_w.dump(data, f))

    def write_heldout(self, x: np.ndarray, y: np.ndarray) -> Path:
        path = self.path / "heldout.npz"
        _atomic(path, lambda f: np.savez(f, x=x, y=y))
        return path

    def write_devices(self, ledger: Ledger) -> None:
        """devices.json: the ledger (every device and what it did) and the latest events."""
        data = {"devices": as_json(ledger.rows()), "events": as_json(list(ledger.events))}
        write_atomic(self.path / "devices.json", json.dumps(data, indent=1).encode())

    def append(self, result: RoundResult) -> None:
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(result.to_dict()) + "\n")

    def checkpoint(self, round_: int, pruner: Pruner) -> Path:
        """Every variable of the wrapped model (weights, masks, thresholds, TF-MOT steps)."""
        path = self.path / "checkpoints" / f"round-{round_:04d}.npz"
        arrays: dict[str, Any] = {"round": np.int64(round_)}
        arrays.update(
            (f"w{i:03d}", np.asarray(w)) for i, w in enumerate(pruner.wrapped.get_weights())
        )
        _atomic(path, lambda f: np.savez(f, **arrays))
        for old in path.parent.glob("round-*.npz"):
            if old != path:
                old.unlink()
        return path

    def save_models(self, pruner: Pruner) -> tuple[Path, Path]:
        wrapped = self.path / "model" / "wrapped.keras"
        stripped = self.path / "model" / "stripped.keras"
        pruner.wrapped.save(wrapped)
        pruner.stripped.save(stripped)
        return wrapped, stripped
