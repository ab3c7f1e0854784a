"""Checks an update must pass before it may touch the global model; failures are data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np

from fedprune.coordinator.aggregation import l2_norm
from fedprune.protocol.codec import Model, Update, decode_update
from fedprune.protocol.errors import (
    ConfigError,
    OversizeError,
    ReplayError,
    SenderError,
    ShapeError,
    SignatureError,
    VersionError,
    WireError,
)
from fedprune.protocol.messages import Hello

if TYPE_CHECKING:
    from fedprune.coordinator.config import RunConfig


class Reason(StrEnum):
    """Why an update was rejected (the keys of ``rejected`` in metrics.jsonl)."""

    VERSION = "version"
    DECODE = "decode"
    OVERSIZE = "oversize"
    ROUND = "round"
    UNSELECTED = "unselected"
    DUPLICATE = "duplicate"
    SHAPE = "shape"
    NONFINITE = "nonfinite"
    NORM = "norm"
    SAMPLES = "samples"
    SENDER = "sender"
    SIGNATURE = "signature"  # not signed by the device whose topic it came on: dropped
    REPLAY = "replay"  # made for another run or coordinator session: dropped
    FAILED = "failed"  # the device said its training failed (no update is coming)
    CODEC = "codec"  # not in the codec the run forces


class Rejected(Exception):
    """Raised inside validation only; the coordinator counts it and goes on."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What an update may be. ``max_samples`` is lowered per device to what its hello declared;
    the last two bound the coordinator's memory for updates still in assembly."""

    max_update_bytes: int = 64 * 1024 * 1024
    max_norm: float = 1e4
    max_samples: int = 10_000_000
    max_payloads_per_device: int = 2
    max_pending_bytes: int = 512 * 1024 * 1024
    control: bool = False  # SCAFFOLD: an update carries its control variate's change

    def __post_init__(self) -> None:
        for name in ("max_update_bytes", "max_samples", "max_payloads_per_device"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.max_norm > 0:
            raise ConfigError(f"max_norm must be > 0, got {self.max_norm!r}")
        if self.max_pending_bytes < self.max_update_bytes:
            raise ConfigError(
                f"max_pending_bytes ({self.max_pending_bytes}) must hold one update"
                f" (max_update_bytes {self.max_update_bytes})"
            )

    @classmethod
    def for_model(cls, model: Model, config: RunConfig) -> Limits:
        """The run's limits for updates of ``model``; by default an update may be twice the
        dense float32 model (a sparse one is at most the dense values, a bitmask and framing)."""
        dense = 4 * sum(int(np.prod(w.shape)) for w in model.weights)
        twice = (4 if config.scaffold else 2) * dense  # SCAFFOLD sends two model-sized parts
        return cls(
            max_update_bytes=config.max_update_bytes or twice + 64 * 1024,
            max_norm=config.max_norm,
            max_samples=config.max_samples,
            max_pending_bytes=max(config.max_pending_bytes, twice + 64 * 1024),
        )

    def for_device(self, hello: Hello | None) -> Limits:
        """The limits for one device: no more samples than its hello declared."""
        if hello is None or hello.num_samples >= self.max_samples:
            return self
        return dataclasses.replace(self, max_samples=max(1, hello.num_samples))


_BY_ERROR: list[tuple[type[WireError], Reason]] = [
    (SenderError, Reason.SENDER),
    (ReplayError, Reason.REPLAY),
    (SignatureError, Reason.SIGNATURE),
    (OversizeError, Reason.OVERSIZE),
    (VersionError, Reason.VERSION),
    (ShapeError, Reason.SHAPE),
]


def classify(error: WireError) -> Reason:
    return next((r for cls, r in _BY_ERROR if isinstance(error, cls)), Reason.DECODE)


def validate(payload: bytes, model: Model, *, round_: int, limits: Limits) -> Update:
    """Decode and check an update for ``round_`` against ``model``; raise ``Rejected`` if bad."""
    if len(payload) > limits.max_update_bytes:
        raise Rejected(Reason.OVERSIZE, f"{len(payload)} bytes > {limits.max_update_bytes}")
    try:
        update = decode_update(payload, model)
    except WireError as exc:
        raise Rejected(classify(exc), str(exc)) from exc
    if update.round != round_:
        raise Rejected(Reason.ROUND, f"update is for round {update.round}, not {round_}")
    if not 0 < update.num_samples <= limits.max_samples:
        raise Rejected(
            Reason.SAMPLES, f"num_samples {update.num_samples} not in 1..{limits.max_samples}"
        )
    if not all(np.all(np.isfinite(d)) for d in update.deltas):
        raise Rejected(Reason.NONFINITE, "update contains NaN or Inf")
    metrics = update.metrics
    if not all(np.isfinite(v) for v in metrics.values()):
        raise Rejected(Reason.NONFINITE, "reported metrics contain NaN or Inf")
    if (
        not 0.0 <= metrics.get("accuracy", 0.0) <= 1.0
        or not 0 <= metrics.get("n_eval", 0.0) <= limits.max_samples
        or not 0 <= metrics.get("epochs", 0.0) <= 1e6
        or not 0 <= metrics.get("batch_size", 0.0) <= 1e9
    ):
        raise Rejected(Reason.SAMPLES, f"reported metrics out of range: {metrics}")
    norm = l2_norm(update.deltas)
    if norm > limits.max_norm:
        raise Rejected(Reason.NORM, f"update norm {norm:.3g} > {limits.max_norm:.3g}")
    if not limits.control:
        return dataclasses.replace(update, control=None)  # not asked for: not used
    if update.control is None:
        raise Rejected(Reason.SHAPE, "a SCAFFOLD run's update carries its control change: none")
    if not all(np.all(np.isfinite(c)) for c in update.control):
        raise Rejected(Reason.NONFINITE, "the control change contains NaN or Inf")
    if (norm := l2_norm(update.control)) > limits.max_norm:
        raise Rejected(Reason.NORM, f"control change norm {norm:.3g} > {limits.max_norm:.3g}")
    return update
