"""The final-model checks that decide whether a run's model is deployed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedprune.coordinator.health import chance, chance_accuracy, verdict
from fedprune.coordinator.result import RoundResult
from fedprune.edge_client.task import Task


def _rounds(
    *accuracies: float | None, recalls: list[list[float] | None] | None = None
) -> list[RoundResult]:
    recalls = recalls or [None] * len(accuracies)
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
            recall=r,
        )
        for i, (a, r) in enumerate(zip(accuracies, recalls, strict=True), start=1)
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


@pytest.mark.parametrize(
    ("last", "class_drop", "expected"),
    [
        ([0.95, 0.90, 0.92, 0.97], 0.10, None),  # the best round's figures: nothing fell
        ([0.95, 0.82, 0.92, 0.97], 0.10, None),  # class 1 down 8 points: within the margin
        (
            [0.95, 0.00, 0.92, 0.01],
            0.10,
            "the final model misses classes its best round (round 2) recalled: 1 (0.90 -> 0.00),"
            " 3 (0.97 -> 0.01)",
        ),
        ([0.95, 0.00, 0.92, 0.01], 0.0, None),  # the check off
        # 16 points down, as an honest skewed run's class went between two rounds: on 36
        # held-out samples of the class, chance explains it
        ([0.95, 0.74, 0.92, 0.97], 0.10, None),
    ],
)
def test_a_final_model_that_lost_a_class_is_flagged_though_its_accuracy_looks_fine(
    last: list[float], class_drop: float, expected: str | None
) -> None:
    # Prepare: round 2 is the best; the last round's overall accuracy is still 0.744 (as the
    # report's backdoored model was), above chance and within 10 points of round 1's
    recalls: list[list[float] | None] = [[0.6, 0.5, 0.6, 0.7], [0.95, 0.90, 0.92, 0.97], last]
    results = _rounds(0.60, 0.93, 0.744, recalls=recalls)

    # Execute
    reason = verdict(results, 0.25, class_drop=class_drop, support=[36, 36, 36, 36])

    # Assert
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(expected)


def test_without_the_held_out_support_no_class_is_judged() -> None:
    recalls: list[list[float] | None] = [[0.9, 0.9], [0.9, 0.0]]
    assert verdict(_rounds(0.9, 0.9, recalls=recalls), 0.5) is None


@pytest.mark.parametrize(
    ("aucs", "expected"),
    [
        ((0.60, 0.93), None),
        ((0.55, 0.53), "final AUC 0.530 is not better than chance (0.500, a reconstruction"),
        ((0.95, 0.80), "final AUC 0.800 is far below round 1's 0.950"),
    ],
)
def test_an_autoencoder_is_judged_on_the_auc_of_its_error_against_chance_at_one_half(
    aucs: tuple[float, ...], expected: str | None
) -> None:
    # Prepare: rounds of a reconstruction: no accuracy, the held-out AUC
    rounds = [
        dataclasses.replace(r, accuracy=None, auc=a)
        for r, a in zip(_rounds(*aucs), aucs, strict=True)
    ]

    # Execute
    reason = verdict(rounds, chance(Task.RECONSTRUCT, np.array([0, 1, 1, 0])))

    # Assert
    assert reason is None if expected is None else reason and reason.startswith(expected)
