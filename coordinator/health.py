"""Is the run's final model worth deploying? Two plain checks against the run's own figures.

A model that is not better than always answering the most frequent held-out class, or that ends
far below the accuracy of its first evaluated round, means something is wrong (a model without a
softmax, a learning rate that diverged, poisoned updates): it is flagged, and the coordinator does
not deploy it unless told to (``--deploy-anyway``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedprune.coordinator.result import RoundResult

CHANCE_MARGIN = 0.05
"""The final accuracy must beat the most frequent class's share by more than this."""

MAX_DROP = 0.10
"""The final accuracy may fall at most this far below the first evaluated round's."""


def chance_accuracy(y: np.ndarray) -> float:
    """The accuracy of always answering the most frequent label of ``y``."""
    counts = np.bincount(np.asarray(y, np.int64).reshape(-1))
    return float(counts.max() / counts.sum())


def verdict(results: Sequence[RoundResult], chance: float | None) -> str | None:
    """Why the final model should not be deployed, or ``None`` when it looks sound.

    Uses the held-out accuracy of each round; without a held-out set there is nothing to judge.
    """
    evaluated = [r for r in results if r.accuracy is not None]
    if not evaluated:
        return None
    first, last = evaluated[0], evaluated[-1]
    assert first.accuracy is not None and last.accuracy is not None
    if chance is not None and last.accuracy <= chance + CHANCE_MARGIN:
        return (
            f"final accuracy {last.accuracy:.3f} is not better than chance ({chance:.3f}, always"
            f" answering the most frequent held-out class)"
        )
    if last.accuracy < first.accuracy - MAX_DROP:
        return (
            f"final accuracy {last.accuracy:.3f} is far below round {first.round}'s"
            f" {first.accuracy:.3f}"
        )
    return None
