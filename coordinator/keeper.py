"""``--keep best``: the round whose model the run exports and deploys is the one with the best
score on the validation share of the held-out set, among the rounds that end at the pruning
schedule's target (an earlier, denser model is no answer to a run that asked for sparsity).

The held-out set is split once, from the run's seed (:func:`split`): the validation share
chooses, the rest (the test share) reports every round's figures, so the figure a run reports
for the model it kept was not used to keep it. The best round's model is written to
``checkpoints/best.npz`` before the round's own checkpoint, so a resumed run keeps it.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.coordinator.pruning import Pruner
from fedprune.coordinator.result import RoundResult
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.files import write_atomic

log = logging.getLogger("fedprune.coordinator")


def split(
    x: np.ndarray, y: np.ndarray, share: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The held-out set as (validation, test): ``share`` of its samples, drawn from ``seed``,
    and the rest. Each gets at least one sample."""
    if len(y) < 2:
        raise ConfigError(f"--keep best splits the held-out set in two: it has {len(y)} sample(s)")
    order = np.random.default_rng([seed, 0x4B45]).permutation(len(y))
    cut = min(len(y) - 1, max(1, round(share * len(y))))
    chosen, rest = np.sort(order[:cut]), np.sort(order[cut:])
    return (x[chosen], y[chosen]), (x[rest], y[rest])


class Best:
    """The best round so far among those from ``eligible`` on, kept in ``path``."""

    def __init__(self, path: Path, eligible: int) -> None:
        self.path = path
        self.eligible = eligible
        self.round = 0  # none yet
        self.score = -math.inf

    def saw(self, result: RoundResult, pruner: Pruner) -> None:
        """A round ended with the model in ``pruner``: keep it if it is the best yet."""
        score = result.validation
        if result.round < self.eligible or score is None or not math.isfinite(score):
            return
        if score <= self.score:
            return
        arrays: dict[str, Any] = {
            "round": np.array(result.round),
            "score": np.array(score),
            "architecture": np.array(pruner.architecture()),
        }
        arrays.update(
            (f"w{i:03d}", np.asarray(w)) for i, w in enumerate(pruner.wrapped.get_weights())
        )
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomic(self.path, buffer.getvalue())
        self.round, self.score = result.round, score

    def resume(self, done: int) -> None:
        """A run resumed after round ``done``: the best of its rounds, if one was kept (a best
        from the round that did not end is forgotten: that round runs again)."""
        if not self.path.is_file():
            return
        with np.load(self.path, allow_pickle=False) as saved:
            kept, score = int(saved["round"]), float(saved["score"])
        if kept <= done:
            self.round, self.score = kept, score
        else:
            self.path.unlink()

    def load_into(self, pruner: Pruner) -> int:
        """Put the kept round's model into ``pruner``; that round (0: none was kept, the last
        round's model stays)."""
        if not self.round:
            return 0
        with np.load(self.path, allow_pickle=False) as saved:
            pruner.load_architecture(str(saved["architecture"]), int(saved["round"]))
            count = sum(name.startswith("w") for name in saved.files)
            pruner.wrapped.set_weights([saved[f"w{i:03d}"] for i in range(count)])
        log.info("keeping round %d: validation score %.4f", self.round, self.score)
        return self.round
