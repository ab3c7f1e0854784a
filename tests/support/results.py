"""A round's metrics line for tests that need one: every field set, any of them given."""

from __future__ import annotations

from typing import Any

from fedprune.coordinator.result import RoundResult


def round_result(round_: int, **fields: Any) -> RoundResult:
    values: dict[str, Any] = dict(
        round=round_,
        accuracy=0.5,
        loss=1.0,
        client_accuracy=None,
        client_loss=None,
        sparsity=0.25,
        bytes_up=1,
        bytes_down=2,
        dense_bytes_up=3,
        dense_bytes_down=4,
        selected=1,
        reported=1,
        rejected={},
        seconds=0.1,
    )
    values.update(fields)
    return RoundResult(**values)
