"""The run directory: config.toml, metrics.jsonl, devices.json, checkpoints/, model/, heldout.npz,
export/."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tomli_w

from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.ledger import Ledger
from fedprune.coordinator.pruning import Pruner
from fedprune.coordinator.result import RoundResult
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.files import write_atomic
from fedprune.protocol.telemetry import as_json


class Stateful(Protocol):
    """A part of the coordinator with state across rounds, kept in the checkpoint."""

    def state(self) -> dict[str, np.ndarray]: ...
    def load(self, state: Mapping[str, np.ndarray], shapes: Sequence[tuple[int, ...]]) -> None: ...


def _atomic(path: Path, write: Any) -> None:
    """Render with ``write(file)`` into memory, then replace ``path`` in one step."""
    buffer = io.BytesIO()
    write(buffer)
    write_atomic(path, buffer.getvalue())


class RunDir:
    def __init__(self, path: Path, *, overwrite: bool = False, resume: bool = False) -> None:
        """A new run directory, or with ``resume`` the one of a run to continue (see
        :meth:`restore`)."""
        self.path = path
        self.metrics = path / "metrics.jsonl"
        if resume:
            if not (path / "config.toml").is_file():
                raise ConfigError(f"{path}: not a run directory (no config.toml) to resume")
            self.metrics.touch()
            return
        if self.metrics.exists() and self.metrics.stat().st_size and not overwrite:
            raise ConfigError(
                f"{path} holds an earlier run; choose another --run name, pass --overwrite, or"
                f" continue it with --resume {path}"
            )
        if overwrite:
            shutil.rmtree(path / "export", ignore_errors=True)
        for sub in ("checkpoints", "model"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        for old in (path / "checkpoints").glob("*.npz"):  # the rounds', and the best (keeper)
            old.unlink()
        self.metrics.write_text("")

    def write_config(self, config: RunConfig) -> None:
        data = {k: v for k, v in config.to_dict().items() if v is not None}
        _atomic(self.path / "config.toml", lambda f: tomli_w.dump(data, f))

    def write_heldout(self, x: np.ndarray, y: np.ndarray, *, name: str = "heldout.npz") -> Path:
        """heldout.npz: what the run reports its figures and verifies its exports on (with
        ``--keep best``, the test share; validation.npz: the share that chose the round)."""
        path = self.path / name
        _atomic(path, lambda f: np.savez(f, x=x, y=y))
        return path

    def write_round_report(self, report: dict[str, Any]) -> None:
        """rounds/round-NNNN.json: who was late (online, no answer when the round closed), gone
        (its connection dropped), stale (its previous-round update counted) and rejected, why."""
        path = self.path / "rounds" / f"round-{report['round']:04d}.json"
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, json.dumps(report, indent=1).encode())

    def write_summary(self, **values: Any) -> None:
        """summary.json: how the run ended (written once it did)."""
        write_atomic(self.path / "summary.json", json.dumps(values, indent=1).encode())

    def write_devices(self, ledger: Ledger) -> None:
        """devices.json: the ledger (every device and what it did) and the latest events."""
        write_atomic(
            self.path / "devices.json", json.dumps(_ledger_json(ledger), indent=1).encode()
        )

    def append(self, result: RoundResult) -> None:
        """Add the round's metrics line, on disk before the round's checkpoint is written."""
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(result.to_dict()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def checkpoint(
        self,
        round_: int,
        pruner: Pruner,
        ledger: Ledger,
        states: Mapping[str, Stateful] | None = None,
    ) -> Path:
        """What a resumed run continues from, written in one step once the round's metrics line
        is written: every variable of the wrapped model (weights, masks, thresholds, TF-MOT
        steps, hence the schedule's position), its architecture (unit pruning rebuilds it
        smaller), the device ledger and the ``states`` by prefix (the server optimizer's,
        SCAFFOLD's control variate: Coordinator.states). The coordinator owns no other state:
        FedAvg and the robust rules keep none across rounds, the codec is stateless, and each
        round's selection is drawn from the seed and the round."""
        path = self.path / "checkpoints" / f"round-{round_:04d}.npz"
        arrays: dict[str, Any] = {
            "round": np.int64(round_),
            "ledger": np.array(json.dumps(_ledger_json(ledger))),
            "architecture": np.array(pruner.architecture()),
        }
        arrays.update(
            (f"w{i:03d}", np.asarray(w)) for i, w in enumerate(pruner.wrapped.get_weights())
        )
        for prefix, part in (states or {}).items():
            arrays.update((prefix + name, a) for name, a in part.state().items())
        _atomic(path, lambda f: np.savez(f, **arrays))
        for old in path.parent.glob("round-*.npz"):
            if old != path:
                old.unlink()
        return path

    def restore(
        self, pruner: Pruner, ledger: Ledger, states: Mapping[str, Stateful] | None = None
    ) -> list[RoundResult]:
        """Load the last checkpoint into ``pruner`` and ``ledger``; the rounds it holds, from
        metrics.jsonl (whose lines after the checkpoint, rounds that did not end, are dropped).
        No checkpoint yet: nothing to load, the run starts at round 1."""
        found = sorted((self.path / "checkpoints").glob("round-*.npz"))
        if not found:
            self.metrics.write_text("")
            return []
        try:
            with np.load(found[-1], allow_pickle=False) as saved:
                done = int(saved["round"])
                weights = [saved[f"w{i:03d}"] for i in range(sum(n[0] == "w" for n in saved.files))]
                book = json.loads(str(saved["ledger"]))
                kept = {
                    prefix: {
                        n[len(prefix) :]: saved[n] for n in saved.files if n.startswith(prefix)
                    }
                    for prefix in states or {}
                }
                if "architecture" in saved.files:  # a unit-pruned model may have been rebuilt
                    pruner.load_architecture(str(saved["architecture"]), done)
            pruner.wrapped.set_weights(weights)
            shapes = [w.shape for w in pruner.model().weights]
            for prefix, part in (states or {}).items():
                part.load(kept[prefix], shapes)
            ledger.restore(book["devices"], book["events"])
            lines = self.metrics.read_text().splitlines()[:done]  # a torn last line is later
            results = [RoundResult(**json.loads(line)) for line in lines]
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"{found[-1]}: cannot resume from this checkpoint ({exc})") from exc
        if [r.round for r in results] != list(range(1, done + 1)):
            raise ConfigError(f"{self.metrics}: does not hold rounds 1 to {done} of the checkpoint")
        write_atomic(
            self.metrics, "".join(json.dumps(r.to_dict()) + "\n" for r in results).encode()
        )
        return results

    def save_models(self, pruner: Pruner) -> tuple[Path, Path]:
        wrapped = self.path / "model" / "wrapped.keras"
        stripped = self.path / "model" / "stripped.keras"
        pruner.wrapped.save(wrapped)
        pruner.stripped.save(stripped)
        return wrapped, stripped


def _ledger_json(ledger: Ledger) -> dict[str, Any]:
    return {"devices": as_json(ledger.rows()), "events": as_json(list(ledger.events))}
