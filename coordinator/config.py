"""The coordinator's run configuration: validated on construction, saved as config.toml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedprune.coordinator.aggregation import Rule
from fedprune.device_profiles import DEFAULT_PROFILE
from fedprune.protocol.codec import Codec
from fedprune.protocol.connection import BrokerSettings
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.signing import SigningKey, Trust, load_signing_key
from fedprune.protocol.topics import check_name

OPTIMIZERS = ("sgd", "adam")

_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}


def _check_types(record: Any) -> None:
    """Every plain field holds its type (a config file may say ``rounds = "ten"``)."""
    for f in dataclasses.fields(record):
        value, wanted = getattr(record, f.name), _TYPES.get(str(f.type))
        if wanted is None:
            continue
        if not isinstance(value, wanted) or isinstance(value, bool) != (wanted == (bool,)):
            raise ConfigError(f"{f.name} must be {f.type}, got {value!r}")


def _enum(record: Any, name: str, kind: type[StrEnum]) -> None:
    """Turn a field given as its string into ``kind``, or say which values it may take."""
    try:
        object.__setattr__(record, name, kind(getattr(record, name)))
    except ValueError:
        values = ", ".join(k.value for k in kind)
        raise ConfigError(
            f"{name} must be one of {values}, got {getattr(record, name)!r}"
        ) from None


class Downlink(StrEnum):
    """How a round's model goes down to the devices."""

    DELTA = "delta"  # also as a change to the previous round's, int8 (or the codec's f32/f16)
    CODEC = "codec"  # also as a change in the run's codec, top-k and zstd included
    FULL = "full"  # only whole (float32 values at the kept positions)


class UnitNorm(StrEnum):
    """The norm that ranks a layer's units for unit pruning (none: prune single weights)."""

    NONE = ""
    L1 = "l1"
    L2 = "l2"


class ScheduleKind(StrEnum):
    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"
    MEAN = "mean"


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """When and how much to prune, counted in rounds.

    ``polynomial``: dense until ``begin_round``, then TF-MOT ``PolynomialDecay`` to ``target`` at
    ``end_round``. ``constant``: TF-MOT ``ConstantSparsity`` at ``target`` from ``begin_round``.
    ``mean``: at every round from ``begin_round`` to ``end_round``, prune the weights whose
    magnitude is below the layer's mean magnitude (``target`` is unused).
    """

    kind: ScheduleKind = ScheduleKind.POLYNOMIAL
    target: float = 0.8
    begin_round: int = 2
    end_round: int = 12
    structure: str = ""  # "M:N" (e.g. "2:4"): TF-MOT m-by-n sparsity at begin_round instead
    # l1 or l2: remove whole Dense units and Conv2D filters of least norm instead of single
    # weights (``target`` is then the share of each layer's units), and rebuild the model smaller
    units: UnitNorm = UnitNorm.NONE
    rebuild_every: int = 0  # units: rebuild every N rounds while pruning too (0: at the end only)
    # units, hybrid: then prune the weights inside the survivors to this sparsity, polynomially
    # from the round the units are done to ``weight_end_round`` (0: as many rounds again)
    weight_target: float = 0.0
    weight_end_round: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        try:
            object.__setattr__(self, "kind", ScheduleKind(self.kind))
        except ValueError:
            kinds = ", ".join(k.value for k in ScheduleKind)
            raise ConfigError(f"schedule must be one of {kinds}, got {self.kind!r}") from None
        if self.structure:
            m, _, n = self.structure.partition(":")
            if not (m.isdigit() and n.isdigit() and 0 < int(m) < int(n)):
                raise ConfigError(f"structure must be M:N with 0 < M < N, got {self.structure!r}")
        if not 0.0 <= self.target < 1.0:
            raise ConfigError(f"target sparsity must be in [0, 1), got {self.target}")
        try:
            object.__setattr__(self, "units", UnitNorm(self.units))
        except ValueError:
            raise ConfigError(
                f"units must be l1 or l2 (the norm that ranks units), got {self.units!r}"
            ) from None
        if self.units and self.structure:
            raise ConfigError("units and structure are two different kinds of pruning: give one")
        if not self.units and (self.rebuild_every or self.weight_target):
            raise ConfigError("rebuild_every and weight_target go with unit pruning (units)")
        if self.rebuild_every < 0:
            raise ConfigError(f"rebuild_every must be >= 0, got {self.rebuild_every}")
        if self.weight_end_round and not self.weight_target:
            raise ConfigError("weight_end_round goes with weight_target (hybrid unit pruning)")
        if self.weight_target and self.kind is ScheduleKind.CONSTANT and not self.weight_end_round:
            raise ConfigError(
                "a constant schedule removes its units at begin_round: give weight_end_round,"
                " the round the weights inside them are pruned by"
            )
        if not 0.0 <= self.weight_target < 1.0:
            raise ConfigError(f"weight_target must be in [0, 1), got {self.weight_target}")
        if self.weight_target and self.weight_end_round and self.weight_end_round <= self.units_end:
            raise ConfigError(
                f"weight_end_round ({self.weight_end_round}) must be after the round the units"
                f" are done ({self.units_end})"
            )
        if self.begin_round < 0:
            raise ConfigError(f"begin_round must be >= 0, got {self.begin_round}")
        if self.kind is not ScheduleKind.CONSTANT and self.end_round <= self.begin_round:
            raise ConfigError(
                f"end_round ({self.end_round}) must be after begin_round ({self.begin_round})"
            )

    @property
    def units_end(self) -> int:
        """The round unit pruning reaches its target (and the model is rebuilt)."""
        return self.begin_round if self.kind is ScheduleKind.CONSTANT else self.end_round

    @property
    def last_round(self) -> int:
        """The round the schedule is done: the target reached, the model rebuilt."""
        if self.weight_target:
            return self.weight_end_round or 2 * self.units_end - self.begin_round
        return self.begin_round if self.m_by_n is not None else self.units_end

    @property
    def m_by_n(self) -> tuple[int, int] | None:
        """``structure`` as TF-MOT's ``sparsity_m_by_n``; ``None`` for magnitude schedules."""
        if not self.structure:
            return None
        m, _, n = self.structure.partition(":")
        return int(m), int(n)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything needed to reproduce a run (the broker URL and paths are where, not what)."""

    run: str = "default"
    broker: str = "mqtt://127.0.0.1:1883"
    ca: str = ""  # TLS and credential files (protocol.connection); never the secrets themselves
    cert: str = ""
    key: str = ""
    credentials: str = ""
    signing_key: str = ""  # the coordinator's Ed25519 signing key (protocol.signing)
    device_keys: str = ""  # folder of <device id>.pub: with it, unsigned devices are refused
    model: str = "cnn"
    rounds: int = 20
    min_clients: int = 3
    clients_per_round: int = 0
    quorum: float = 1.0
    round_timeout: float = 60.0
    join_timeout: float = 120.0
    local_epochs: int = 2
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_payload: int = 256 * 1024
    heldout: str = ""
    out: str = "runs"
    profile: str = DEFAULT_PROFILE
    seed: int = 0
    overwrite: bool = False  # replace an earlier run of the same name in out/
    deploy_anyway: bool = False  # deploy a final model that fails coordinator.health's checks
    install_wait: float = 15.0  # seconds devices get to confirm a deployed model before the end
    aggregation: Rule = Rule.FEDAVG
    clip_norm: float = 0.0  # scale updates with a larger L2 norm down to it (0 = off)
    # Updates of the previous round that arrive during the next count with their samples times
    # this weight (FedAvg only); 0 = rejected as late, as before
    staleness_weight: float = 0.0
    trim: float = 0.1  # share of the largest and of the smallest values trimmed-mean drops
    # What an update may be (coordinator.validation.Limits); 0 bytes = twice the dense model
    max_update_bytes: int = 0
    max_norm: float = 1e4
    max_samples: int = 10_000_000
    max_pending_bytes: int = 512 * 1024 * 1024
    # Aggregator processes that take the updates (MQTT 5 shared subscription) and send partial
    # sums (fedprune-aggregator, docs/scaling.md); 0 = the coordinator takes them itself
    aggregators: int = 0
    # How updates travel (protocol.codec.Codec, e.g. int8+top0.1+zstd); "auto" = each device
    # picks by its profile's uplink (codec.default_codec)
    codec: str = "auto"
    # delta: a round's model also goes as a change to the previous round's, quantized like the
    # updates (int8 unless the codec says f32 or f16), to the devices that hold that one; codec:
    # the change in the run's codec, top-k and zstd included (what is left out goes with a later
    # round); full: only whole (float32 values at the kept positions)
    downlink: Downlink = Downlink.DELTA

    def __post_init__(self) -> None:
        _check_types(self)
        _enum(self, "downlink", Downlink)
        _enum(self, "aggregation", Rule)
        checks: list[tuple[str, bool, str]] = [
            ("rounds", self.rounds >= 1, ">= 1"),
            ("min_clients", self.min_clients >= 1, ">= 1"),
            ("clients_per_round", self.clients_per_round >= 0, ">= 0 (0 = all)"),
            ("quorum", 0.0 < self.quorum <= 1.0, "in (0, 1]"),
            ("round_timeout", self.round_timeout > 0, "> 0"),
            ("install_wait", self.install_wait >= 0, ">= 0"),
            ("local_epochs", self.local_epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("max_payload", self.max_payload >= 4096, ">= 4096 bytes"),
            ("max_update_bytes", self.max_update_bytes >= 0, ">= 0 (0 = twice the dense model)"),
            ("max_norm", self.max_norm > 0, "> 0"),
            ("clip_norm", self.clip_norm >= 0, ">= 0 (0 = off)"),
            ("staleness_weight", 0.0 <= self.staleness_weight <= 1.0, "in [0, 1] (0 = off)"),
            ("trim", 0.0 <= self.trim < 0.5, "in [0, 0.5)"),
            ("max_samples", self.max_samples >= 1, ">= 1"),
            ("max_pending_bytes", self.max_pending_bytes >= 1, ">= 1"),
            ("aggregators", self.aggregators >= 0, ">= 0 (0 = none)"),
        ]
        check_name(self.run, "run name")
        if self.codec != "auto":
            try:
                Codec.parse(self.codec)
            except ValueError as exc:
                raise ConfigError(f"codec: {exc}") from exc
        elif self.downlink is Downlink.CODEC:
            raise ConfigError("--downlink codec sends changes in the run's codec: give --codec")
        if self.aggregators and (self.aggregation != "fedavg" or self.staleness_weight):
            raise ConfigError(
                "aggregators add partial sums: they need --aggregation fedavg and"
                " no --staleness-weight"
            )
        if self.staleness_weight and self.aggregation != "fedavg":
            raise ConfigError(
                f"staleness_weight needs --aggregation fedavg ({self.aggregation} weighs every"
                " update the same)"
            )
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        last = self.schedule.last_round
        if last > self.rounds:
            raise ConfigError(
                f"the pruning schedule ends at round {last}, after the last"
                f" round {self.rounds}: the target sparsity would never be reached"
            )

    def signatures(self) -> tuple[SigningKey | None, Trust]:
        """The coordinator's signing key and the devices it trusts (both, or unsigned)."""
        if bool(self.signing_key) != bool(self.device_keys):
            raise ConfigError("signed operation needs both --signing-key and --device-keys")
        if not self.signing_key:
            return None, Trust()
        return load_signing_key(self.signing_key), Trust.from_folder(self.device_keys)

    def broker_settings(self) -> BrokerSettings:
        """How to reach the broker (credentials from the file, else the environment)."""
        return BrokerSettings.load(
            self.broker, ca=self.ca, cert=self.cert, key=self.key, credentials=self.credentials
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.run

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["schedule"]["kind"] = self.schedule.kind.value
        data["downlink"] = self.downlink.value
        data["aggregation"] = self.aggregation.value
        data["schedule"]["units"] = self.schedule.units.value
        return data
