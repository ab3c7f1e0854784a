"""The final-model checks that decide whether a run's model is deployed."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.coordinator.health import chance_accuracy, verdict
from fedprune.coordinator.result import RoundResult


def _rounds(*accuracies: float | None) -> list[RoundResult]:
    return [
        RoundResult(
            round=i,
            accuracy=a,
            loss=None,
            client_accuracy=None,
            client_loss=None,
            sparsity=0.0,
            bytes_up=0,
            bytes_down=0,
            dense_bytes_up=0,
            dense_bytes_down=0,
            selected=1,
            reported=1,
            rejected={},
            seconds=0.0,
        )
        for i, a in enumerate(accuracies, start=1)
    ]


def test_chance_is_the_share_of_the_most_frequent_label() -> None:
    assert chance_accuracy(np.array([0, 1, 1, 2, 1, 3, 1, 1])) == pytest.approx(5 / 8)


@pytest.mark.parametrize(
    ("accuracies", "chance", "expected"),
    [
        ((0.40, 0.80, 0.96), 0.11, None),
        ((0.40, 0.31), 0.11, None),  # down 9 points: within the allowed drop
        ((0.11, 0.112), 0.102, "final accuracy 0.112 is not better than chance (0.102"),
        ((0.90, 0.70), 0.11, "final accuracy 0.700 is far below round 1's 0.900"),
        ((None, 0.85, 0.60), 0.11, "final accuracy 0.600 is far below round 2's 0.850"),
        ((None, None), 0.11, None),  # no held-out evaluation: nothing to judge
        ((0.90, 0.70), None, "final accuracy 0.700 is far below round 1's 0.900"),
    ],
)
def test_a_final_model_at_chance_or_far_below_its_first_round_is_flagged(
    accuracies: tuple[float | None, ...], chance: float | None, expected: str | None
) -> None:
    # Execute
    reason = verdict(_rounds(*accuracies), chance)

    # Assert
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected)
