"""Is the run's final model worth deploying? Three plain checks against the run's own figures.

A model that is not better than chance (always answering the most frequent held-out class; for an
autoencoder, an AUC of one half on the held-out anomaly labels), that ends far below the score
(accuracy or AUC) of its first evaluated round, or one of whose classes the model now misses far
more often than in its best round, means something is wrong (a model without a softmax, a
learning rate that diverged, poisoned updates, a backdoor: one last update that erases a class
can leave the overall accuracy looking fine): it is flagged, and the coordinator does not deploy
it unless told to (``--deploy-anyway``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import fisher_exact

from fedprune.coordinator.result import RoundResult
from fedprune.edge_client.task import Task

CHANCE_MARGIN = 0.05
"""The final score must beat chance by more than this."""

MAX_DROP = 0.10
"""The final score may fall at most this far below the first evaluated round's."""

CLASS_DROP = 0.10
"""A class's held-out recall may fall at most this far below the best round's (``--class-drop``)."""

CHANCE_FALL = 0.001
"""...unless chance explains the fall: a class's recall goes up and down between rounds on a small
held-out set (measured: 16 points, 6 of 36 samples, between two rounds of an honest skewed mlp
run). A fall is flagged only when a one-sided Fisher exact test over the class's held-out samples
puts its probability by chance below this (a class erased by a backdoor: about 1e-19)."""


def chance_accuracy(y: np.ndarray) -> float:
    """The accuracy of always answering the most frequent label of ``y``."""
    counts = np.bincount(np.asarray(y, np.int64).reshape(-1))
    return float(counts.max() / counts.sum())


def chance(task: Task, y: np.ndarray) -> float:
    """The score of a model that knows nothing: always answering the most frequent class, or
    a reconstruction error unrelated to the anomaly labels (an AUC of one half)."""
    return chance_accuracy(y) if task is Task.CLASSIFY else 0.5


def verdict(
    results: Sequence[RoundResult],
    chance: float | None,
    *,
    class_drop: float = CLASS_DROP,
    support: Sequence[int] = (),
) -> str | None:
    """Why the final model should not be deployed, or ``None`` when it looks sound.

    Uses the held-out accuracy (and recall per class) of each round; without a held-out set
    there is nothing to judge. A class whose recall is more than ``class_drop`` below the best
    round's (by accuracy), beyond chance given its ``support`` (held-out samples per class), is
    named (``class_drop`` 0, or no support: that check is off).
    """
    evaluated = [r for r in results if r.score is not None]
    if not evaluated:
        return None
    first, last = evaluated[0], evaluated[-1]
    assert first.score is not None and last.score is not None
    name = last.metric
    if chance is not None and last.score <= chance + CHANCE_MARGIN:
        meaning = (
            "always answering the most frequent held-out class"
            if name == "accuracy"
            else "a reconstruction error that says nothing of the anomaly labels"
        )
        return f"final {name} {last.score:.3f} is not better than chance ({chance:.3f}, {meaning})"
    if last.score < first.score - MAX_DROP:
        return f"final {name} {last.score:.3f} is far below round {first.round}'s {first.score:.3f}"
    return _fallen_classes(evaluated, class_drop, support) if class_drop > 0 else None


def _fallen_classes(
    evaluated: Sequence[RoundResult], class_drop: float, support: Sequence[int]
) -> str | None:
    """The classes the final model recalls far less often than the best round's did."""
    last = evaluated[-1]
    best = max(
        (r for r in evaluated if r.recall is not None),
        key=lambda r: r.accuracy or 0.0,
        default=None,
    )
    if best is None or best.recall is None or last.recall is None:
        return None
    fallen = [
        f"{c} ({was:.2f} -> {now:.2f})"
        for c, (was, now, n) in enumerate(zip(best.recall, last.recall, support, strict=False))
        if was - now > class_drop and _beyond_chance(was, now, n)
    ]
    if not fallen:
        return None
    return (
        f"the final model misses classes its best round (round {best.round}) recalled:"
        f" {', '.join(fallen)}, a fall of more than {class_drop:.2f} (a targeted update, or a"
        " broken model)"
    )


def _beyond_chance(was: float, now: float, samples: int) -> bool:
    """Whether a recall that fell from ``was`` to ``now`` over ``samples`` held-out samples is
    unlikely to be chance (:data:`CHANCE_FALL`)."""
    hits = [round(was * samples), round(now * samples)]
    table = [[hits[0], samples - hits[0]], [hits[1], samples - hits[1]]]
    return bool(fisher_exact(table, alternative="greater").pvalue < CHANCE_FALL)
