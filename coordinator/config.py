"""The coordinator's run configuration: validated on construction, saved as config.toml."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedprune.coordinator.aggregation import Rule
from fedprune.coordinator.server_optimizer import ServerOptimizer, ServerRule
from fedprune.device_profiles import DEFAULT_PROFILE
from fedprune.protocol.codec import Codec
from fedprune.protocol.connection import BrokerSettings
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import PROX, SCAFFOLD, SCHEDULE
from fedprune.protocol.signing import SigningKey, Trust, load_signing_key
from fedprune.protocol.topics import check_name

OPTIMIZERS = ("sgd", "adam")


def option(
    default: Any,
    help: str,  # noqa: A002 - argparse's name
    *,
    flag: str = "",
    metavar: str | None = None,
    choices: tuple[str, ...] = (),
) -> Any:
    """A run option: the field and its one description, from which the command-line flag
    (``--flag``, by default the field's name with dashes), the config file's key (the field's
    name) and its check are made (coordinator.options)."""
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices}
    return field(default=default, metadata=meta)


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


class LrSchedule(StrEnum):
    """How the devices' learning rate goes over the rounds."""

    CONSTANT = "constant"  # --lr every round
    EXPONENTIAL = "exponential"  # --lr * --lr-decay ** (round - 1)
    COSINE = "cosine"  # from --lr at round 1 down along a half cosine, --lr / rounds at the last


class Keep(StrEnum):
    """Which round's model the run exports and deploys."""

    LAST = "last"
    BEST = "best"  # the best score on the validation half of --heldout


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

    kind: ScheduleKind = option(
        ScheduleKind.POLYNOMIAL,
        "pruning schedule, in rounds (default: %(default)s)",
        flag="schedule",
    )
    target: float = option(0.8, "target sparsity (default: %(default)s)")
    begin_round: int = option(2, "first round that prunes (default: %(default)s)")
    end_round: int = option(12, "round at which the target is reached (default: %(default)s)")
    structure: str = option(
        "",
        "structured sparsity instead of the schedule: M zeros in every N consecutive weights "
        "(TF-MOT sparsity_m_by_n, e.g. 2:4), applied at --begin-round",
        metavar="M:N",
    )
    units: UnitNorm = option(
        UnitNorm.NONE,
        "structural pruning: remove whole channels (units, filters) of least L1 or L2 norm, "
        "with the channels coupled to them (both inputs of an Add, a depthwise convolution's), "
        "--target being the share of each layer's (family's) channels, and rebuild the model "
        "smaller when the schedule is done; devices switch to it",
    )
    rebuild_every: int = option(
        0,
        "with --units: rebuild the model every N rounds while pruning too (default: at the "
        "end only)",
        metavar="N",
    )
    weight_target: float = option(
        0.0,
        "with --units (hybrid): then prune weights inside the remaining units to this "
        "sparsity, polynomially until --weight-end-round (default: off)",
    )
    weight_end_round: int = option(
        0,
        "with --weight-target: the round it is reached (default: as many rounds after the "
        "units are done as they took)",
    )

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
    def at_target(self) -> int:
        """The first round whose model is at the schedule's target (1: a run that prunes
        nothing)."""
        pruned = self.target or self.structure or self.units or self.weight_target
        return self.last_round if pruned else 1

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

    run: str = option("default", "run name: topic root and run directory name")
    # Where the broker is and what proves who we are to it: protocol.options.add_broker_arguments
    broker: str = field(default="mqtt://127.0.0.1:1883", metadata={"broker": True})
    ca: str = field(default="", metadata={"broker": True})  # never the secrets themselves
    cert: str = field(default="", metadata={"broker": True})
    key: str = field(default="", metadata={"broker": True})
    credentials: str = field(default="", metadata={"broker": True})
    signing_key: str = option(
        "",
        "the coordinator's Ed25519 signing key (with --device-keys): everything the coordinator"
        " publishes is signed with it",
        metavar="FILE",
    )
    device_keys: str = option(
        "",
        "folder of <device id>.pub verify keys; messages not signed by one of them are "
        "dropped, and unsigned devices refused (fedprune-provision writes both)",
        metavar="DIR",
    )
    model: str = option(
        "cnn",
        "preset (cnn, mlp; resnet8, dscnn, mobilenet, autoencoder after MLPerf Tiny) or path to"
        " a .keras/.h5 model (default: %(default)s)",
    )
    task: str = option(
        "auto",
        "what the model learns: classify (a softmax output, scored by accuracy), reconstruct (an"
        " output the input's size, the input as target: an autoencoder, scored by MSE and by the"
        " ROC AUC of its error where --heldout labels mark anomalies, 0 normal) or auto, from"
        " the model's output (default: %(default)s)",
        choices=("auto", "classify", "reconstruct"),
    )
    rounds: int = option(20, "rounds (default: %(default)s)")
    min_clients: int = option(3, "clients that must join before round 1 (default: %(default)s)")
    clients_per_round: int = option(
        0, "clients sampled per round, 0 = all online (default: %(default)s)"
    )
    quorum: float = option(
        1.0, "share of selected clients that closes a round early (default: %(default)s)"
    )
    round_timeout: float = option(60.0, "seconds a round waits for updates (default: %(default)s)")
    join_timeout: float = option(120.0, "seconds to wait for them (default: %(default)s)")
    local_epochs: int = option(2, "epochs each client trains per round (default: %(default)s)")
    batch_size: int = option(32, "(default: %(default)s)")
    optimizer: str = option("sgd", "(default: %(default)s)", choices=OPTIMIZERS)
    learning_rate: float = option(0.05, "(default: %(default)s)", flag="lr")
    momentum: float = option(0.9, "(default: %(default)s)")
    lr_schedule: LrSchedule = option(
        LrSchedule.CONSTANT,
        "the devices' learning rate over the rounds: constant, exponential (times --lr-decay each"
        " round) or cosine (a half cosine from --lr to --lr / rounds; default: %(default)s)",
    )
    lr_decay: float = option(
        0.95, "exponential --lr-schedule: the factor each round (default: %(default)s)"
    )
    prox_mu: float = option(
        0.0,
        "FedProx: devices add mu/2 * ||w - w_round||^2 to their loss, which holds them near the"
        " round's model on skewed data (default: 0 = off)",
        metavar="MU",
    )
    scaffold: bool = option(
        False,
        "SCAFFOLD: devices correct each local step by control variates (theirs, kept in their"
        " cache, and the coordinator's, sent each round) and send their variate's change with"
        " each update (about twice the uplink and a model's more downlink)",
    )
    server_optimizer: ServerRule = option(
        ServerRule.SGD,
        "the coordinator's optimizer, which takes the round's aggregate as a pseudo-gradient"
        " (Reddi et al. 2021): sgd (with --server-lr 1: FedAvg), momentum (FedAvgM), adam, yogi,"
        " adagrad (default: %(default)s)",
    )
    server_lr: float = option(
        0.0,
        "its learning rate (default: 1 for sgd and momentum, 0.01 for adam and yogi, 0.03 for"
        ' adagrad: docs/benchmarks.md, "Convergence on skewed data")',
    )
    server_momentum: float = option(0.9, "momentum's (default: %(default)s)")
    server_beta1: float = option(
        0.9, "adam, yogi, adagrad: the aggregate's average (default: %(default)s)"
    )
    server_beta2: float = option(
        0.99, "adam, yogi: the squared aggregate's average (default: %(default)s)"
    )
    server_tau: float = option(
        1e-3, "adam, yogi, adagrad: their adaptivity, as tau in Reddi et al. (default: %(default)s)"
    )
    keep: Keep = option(
        Keep.LAST,
        "the round whose model is exported and deployed: last, or best, the best score on a"
        " validation share of --heldout among the rounds at the pruning target (the rest of"
        " --heldout then reports every round's figures; default: %(default)s)",
    )
    validation: float = option(
        0.5, "with --keep best: the share of --heldout that chooses (default: %(default)s)"
    )
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_payload: int = option(
        256 * 1024, "largest MQTT payload in bytes; bigger ones are chunked (default: %(default)s)"
    )
    heldout: str = option(
        "", ".npz (x, y) the coordinator evaluates on and exports with (optional)"
    )
    out: str = option("runs", "folder of run directories (default: %(default)s)")
    profile: str = option(
        DEFAULT_PROFILE, "device profile of the final export (default: %(default)s)"
    )
    seed: int = option(0, "(default: %(default)s)")
    overwrite: bool = option(False, "replace an earlier run of the same name")
    deploy_anyway: bool = option(
        False,
        "deploy the final model even when it is not better than chance or ends far below "
        "its first evaluated round (such a run is otherwise exported but not deployed)",
    )
    class_drop: float = option(
        0.10,
        "do not deploy a final model that recalls any class of the held-out set this much less"
        " often than the run's best round did (a backdoor; 0 = off; default: %(default)s)",
    )
    install_wait: float = option(
        15.0,
        "seconds devices get to confirm the deployed model before the run ends "
        "(default: %(default)s)",
    )
    aggregation: Rule = option(
        Rule.AUTO,
        "how updates are combined: fedavg (weighted by samples); the robust median and "
        "trimmed-mean, which weigh every device the same; screened: fedavg of the updates that do"
        " not make the held-out loss worse (needs --heldout). auto: screened in a signed fleet"
        " with --heldout (median without), fedavg otherwise and with --aggregators"
        " (default: %(default)s)",
    )
    weight_cap: float = option(
        3.0,
        "no update weighs more than this many times the median sample count its round's devices"
        " declared, whatever its device claims (fedavg; 0 = off; default: %(default)s)",
    )
    clip_multiple: float = option(
        3.0,
        "clip each update to this many times the median norm of the previous round's updates"
        " (the first round: to the model's own norm; 0 = off; default: %(default)s)",
        metavar="M",
    )
    clip_norm: float = option(
        0.0, "clip each update to this fixed L2 norm instead (default: 0 = --clip-multiple)"
    )
    staleness_weight: float = option(
        0.0,
        "count an update of the previous round that arrives late, during the next, with its "
        "samples times W (fedavg only; default: 0 = rejected as late)",
        metavar="W",
    )
    trim: float = option(
        0.1,
        "trimmed-mean: share of the largest and of the smallest values dropped per weight "
        "(default: %(default)s)",
    )
    # What an update may be (coordinator.validation.Limits)
    max_update_bytes: int = option(
        0, "largest update a device may send (default: twice the dense float32 model)"
    )
    max_norm: float = option(1e4, "largest L2 norm of an update (default: %(default)s)")
    max_samples: int = option(
        10_000_000,
        "most samples an update may claim; never more than the device's hello declared "
        "(default: %(default)s)",
    )
    max_pending_bytes: int = option(
        512 * 1024 * 1024,
        "memory for updates still in assembly, all devices together (default: %(default)s)",
    )
    aggregators: int = option(
        0,
        "N fedprune-aggregator processes take the updates through an MQTT 5 shared "
        "subscription and send partial sums (fedavg; docs/scaling.md; default: 0 = none)",
        metavar="N",
    )
    codec: str = option(
        "auto",
        "how devices send updates: auto (each by its profile's uplink), or one for all, "
        "such as f32, f16, int8, int8sr (stochastic rounding), int8+top0.1 (the largest 10%% "
        "of the kept values, with error feedback), int8+top0.1+zstd (default: %(default)s)",
        metavar="CODEC",
    )
    downlink: Downlink = option(
        Downlink.DELTA,
        "delta: send each round's model as a change to the previous one (int8 unless "
        "--codec says f32 or f16) to the devices that hold it, whole to the others; codec: the "
        "change in the --codec given, top-k and zstd included (what it leaves out goes later); "
        "full: always whole (default: %(default)s)",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _enum(self, "downlink", Downlink)
        _enum(self, "aggregation", Rule)
        _enum(self, "lr_schedule", LrSchedule)
        _enum(self, "keep", Keep)
        _enum(self, "server_optimizer", ServerRule)
        if self.aggregation is Rule.AUTO:
            robust = self.signing_key and not self.aggregators and not self.staleness_weight
            chosen = Rule.SCREENED if self.heldout else Rule.MEDIAN
            object.__setattr__(self, "aggregation", chosen if robust else Rule.FEDAVG)
        checks: list[tuple[str, bool, str]] = [
            ("rounds", self.rounds >= 1, ">= 1"),
            ("min_clients", self.min_clients >= 1, ">= 1"),
            ("clients_per_round", self.clients_per_round >= 0, ">= 0 (0 = all)"),
            ("quorum", 0.0 < self.quorum <= 1.0, "in (0, 1]"),
            ("round_timeout", self.round_timeout > 0, "> 0"),
            ("install_wait", self.install_wait >= 0, ">= 0"),
            ("class_drop", 0.0 <= self.class_drop <= 1.0, "in [0, 1] (0 = off)"),
            ("local_epochs", self.local_epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("lr_decay", 0.0 < self.lr_decay <= 1.0, "in (0, 1]"),
            ("validation", 0.0 < self.validation < 1.0, "in (0, 1)"),
            ("prox_mu", 0.0 <= self.prox_mu < math.inf, ">= 0"),
            ("server_lr", 0.0 <= self.server_lr < math.inf, "> 0 (0 = the optimizer's default)"),
            ("server_momentum", 0.0 <= self.server_momentum < 1.0, "in [0, 1)"),
            ("server_beta1", 0.0 <= self.server_beta1 < 1.0, "in [0, 1)"),
            ("server_beta2", 0.0 <= self.server_beta2 < 1.0, "in [0, 1)"),
            ("server_tau", 0.0 < self.server_tau < math.inf, "> 0"),
            ("max_payload", self.max_payload >= 4096, ">= 4096 bytes"),
            ("max_update_bytes", self.max_update_bytes >= 0, ">= 0 (0 = twice the dense model)"),
            ("max_norm", self.max_norm > 0, "> 0"),
            ("clip_norm", self.clip_norm >= 0, ">= 0 (0 = --clip-multiple)"),
            ("clip_multiple", self.clip_multiple == 0 or self.clip_multiple >= 1, ">= 1 (0 = off)"),
            ("weight_cap", self.weight_cap == 0 or self.weight_cap >= 1, ">= 1 (0 = off)"),
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
        if self.aggregators and self.scaffold:
            raise ConfigError("aggregators add partial sums of updates, not SCAFFOLD's variates")
        if self.aggregators and (self.aggregation != "fedavg" or self.staleness_weight):
            raise ConfigError(
                "aggregators add partial sums: they need --aggregation fedavg and"
                " no --staleness-weight"
            )
        per_round = self.clients_per_round or self.min_clients
        if self.aggregation is Rule.TRIMMED_MEAN and (per_round < 3 or self.trim <= 0):
            raise ConfigError(
                f"trimmed-mean of {per_round} device(s) a round with trim {self.trim:g} trims"
                " nothing: it would be the plain mean (give --trim > 0 and at least 3 devices a"
                " round, --clients-per-round or --min-clients; or --aggregation median)"
            )
        if self.aggregation is Rule.SCREENED and not self.heldout:
            raise ConfigError(
                "--aggregation screened measures each update on the held-out set: give --heldout"
            )
        if self.keep is Keep.BEST and not self.heldout:
            raise ConfigError(
                "--keep best chooses the round on a validation share of the held-out set:"
                " give --heldout"
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

    def learning_rate_of(self, round_: int) -> float:
        """The devices' learning rate in round ``round_`` (``--lr-schedule``)."""
        if self.lr_schedule is LrSchedule.EXPONENTIAL:
            return self.learning_rate * self.lr_decay ** (round_ - 1)
        if self.lr_schedule is LrSchedule.COSINE:
            lowest = self.learning_rate / self.rounds
            share = (round_ - 1) / max(1, self.rounds - 1)
            return lowest + (self.learning_rate - lowest) * 0.5 * (1 + math.cos(math.pi * share))
        return self.learning_rate

    @property
    def training_rules(self) -> frozenset[str]:
        """The local training rules devices must follow for this run (Hello.training)."""
        rules = {
            PROX: bool(self.prox_mu),
            SCHEDULE: self.lr_schedule is not LrSchedule.CONSTANT,
            SCAFFOLD: self.scaffold,
        }
        return frozenset(rule for rule, used in rules.items() if used)

    def server(self) -> ServerOptimizer:
        """The run's server optimizer, with no state yet."""
        return ServerOptimizer(
            self.server_optimizer,
            lr=self.server_lr,
            momentum=self.server_momentum,
            beta1=self.server_beta1,
            beta2=self.server_beta2,
            tau=self.server_tau,
        )

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return value.value if isinstance(value, StrEnum) else value

        data = {k: plain(v) for k, v in dataclasses.asdict(self).items()}
        data["schedule"] = {k: plain(v) for k, v in data["schedule"].items()}
        return data
