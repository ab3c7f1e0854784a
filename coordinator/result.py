"""What a round comes to: one line of metrics.jsonl, and who was late, gone or rejected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedprune.coordinator.aggregation import median_norm
from fedprune.coordinator.intake import RoundState
from fedprune.edge_client.task import Evaluation


@dataclass(kw_only=True)
class RoundResult:
    """One line of metrics.jsonl."""

    round: int
    accuracy: float | None
    loss: float | None
    client_accuracy: float | None
    client_loss: float | None
    sparsity: float
    bytes_up: int
    bytes_down: int
    dense_bytes_up: int
    dense_bytes_down: int
    selected: int
    reported: int
    rejected: dict[str, int]
    seconds: float
    late: int = 0  # selected, and had not answered when the round closed (gone ones too)
    stale: int = 0  # updates of the previous round counted here (RunConfig.staleness_weight)
    codecs: dict[str, int] = field(default_factory=dict)  # accepted updates by codec (1.7)
    parameters: int = 0  # the model's, after the round (fewer once unit pruning rebuilt it)
    overdue: int = 0  # devices that resent their update for want of a notice (Hello.unanswered)
    recall: list[float] | None = None  # held-out recall of each class (health.verdict)
    capped: int = 0  # updates whose sample claim counted as the round's cap (weight_cap)
    norm_bound: float = 0.0  # the L2 norm updates were clipped to (aggregation.NormBound; 0: none)
    norm_median: float | None = None  # the median norm of the updates taken, before clipping
    clipped: int = 0  # updates larger than norm_bound, scaled down to it
    left_out: int = 0  # accepted updates the rule left out (screened: they made the loss worse)
    auc: float | None = None  # a reconstruction's held-out AUC on anomaly labels (edge_client.task)
    validation: float | None = None  # the score on the validation split (--keep best)

    @property
    def score(self) -> float | None:
        """The held-out accuracy, or a reconstruction's AUC (health.verdict)."""
        return self.accuracy if self.accuracy is not None else self.auc

    @property
    def metric(self) -> str:
        """What ``score`` is: ``accuracy`` or ``AUC``."""
        return "accuracy" if self.accuracy is not None or self.auc is None else "AUC"

    @classmethod
    def of(
        cls,
        state: RoundState,
        evaluation: Evaluation | None,
        *,
        drawn: int,
        dense: int,
        sparsity: float,
        parameters: int,
        bytes_down: int,
        seconds: float,
        validation: float | None = None,
    ) -> RoundResult:
        """A closed round's line: ``drawn`` devices were selected at the draw; ``dense`` is the
        float32 size of the model the run began with (what dense FedAvg would send each way)."""
        client = state.aggregator.client_metrics()
        return cls(
            round=state.round,
            accuracy=None if evaluation is None else evaluation.accuracy,
            loss=None if evaluation is None else evaluation.loss,
            client_accuracy=client.get("accuracy"),
            client_loss=client.get("loss"),
            sparsity=sparsity,
            bytes_up=state.bytes_up,
            bytes_down=bytes_down,
            dense_bytes_up=dense * len(state.reported),
            dense_bytes_down=dense * drawn,
            selected=len(state.selected),
            reported=len(state.reported),
            rejected=dict(state.rejected),
            seconds=seconds,
            late=len(state.late()),
            stale=len(state.stale),
            codecs=dict(state.codecs),
            parameters=parameters,
            overdue=len(state.claimed),
            recall=None if evaluation is None else evaluation.recall,
            capped=len(state.capped),
            norm_bound=state.aggregator.clip_norm,
            norm_median=median_norm(state.aggregator.norms),
            clipped=state.aggregator.clipped(),
            left_out=len(state.aggregator.left_out),
            auc=None if evaluation is None else evaluation.auc,
            validation=validation,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def round_report(state: RoundState, online: set[str]) -> dict[str, Any]:
    """Who was late (still ``online``) or gone (their connection dropped), stale, rejected (and
    why), capped or left out by the rule in a closed round: runs/<run>/rounds/round-NNNN.json."""
    late = state.late()
    return {
        "round": state.round,
        "late": [c for c in late if c in online],
        "stale": state.stale,
        "gone": [c for c in late if c not in online],
        "rejected": state.why,
        "capped": state.capped,
        "left_out": state.aggregator.left_out,
    }
