"""The run configuration refuses bad values on construction, naming them (coordinator/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedprune.coordinator.config import RunConfig, ScheduleConfig, ScheduleKind
from fedprune.coordinator.telemetry import config_summary
from fedprune.protocol.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rounds": 0}, "rounds must be >= 1, got 0"),
        ({"quorum": 0}, "quorum must be in (0, 1], got 0"),
        ({"quorum": 1.5}, "quorum must be in (0, 1], got 1.5"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, got 'rmsprop'"),
        ({"min_clients": 0}, "min_clients must be >= 1, got 0"),
        ({"round_timeout": 0.0}, "round_timeout must be > 0, got 0.0"),
        ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
        ({"max_payload": 1024}, "max_payload must be >= 4096 bytes, got 1024"),
        ({"staleness_weight": 1.5}, "staleness_weight must be in [0, 1] (0 = off), got 1.5"),
        (
            {"staleness_weight": 0.5, "aggregation": "median"},
            "staleness_weight needs --aggregation fedavg (median weighs every update the same)",
        ),
        ({"rounds": 2.5}, "rounds must be int, got 2.5"),
        ({"deploy_anyway": 1}, "deploy_anyway must be bool, got 1"),
        (
            {"run": "a/b"},
            "run name 'a/b': use letters, digits, '.', '_' or '-', starting with a letter or digit"
            " (it names an MQTT topic level and a folder)",
        ),
    ],
)
def test_bad_value_is_refused_naming_field_and_value(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        RunConfig(**kwargs)  # type: ignore[arg-type]

    assert str(caught.value) == message


def test_schedule_ending_after_the_last_round_is_refused() -> None:
    schedule = ScheduleConfig(begin_round=2, end_round=12)

    with pytest.raises(ConfigError) as caught:
        RunConfig(rounds=10, schedule=schedule)

    assert "round 12" in str(caught.value)
    assert "last round 10" in str(caught.value)


def test_constant_schedule_may_have_any_end_round() -> None:
    schedule = ScheduleConfig(kind=ScheduleKind.CONSTANT, begin_round=2, end_round=50)

    config = RunConfig(rounds=5, schedule=schedule)

    assert config.schedule.end_round == 50


def test_schedule_ending_on_the_last_round_is_accepted() -> None:
    config = RunConfig(rounds=12, schedule=ScheduleConfig(begin_round=2, end_round=12))

    assert config.rounds == 12


def test_to_dict_is_plain_data_and_run_dir_joins_out_and_run() -> None:
    config = RunConfig(run="exp-1", out="runs", rounds=12)

    data = config.to_dict()

    assert data["schedule"] == {
        "kind": "polynomial",
        "target": 0.8,
        "begin_round": 2,
        "end_round": 12,
        "structure": "",
        "units": "",
        "rebuild_every": 0,
        "weight_target": 0.0,
        "weight_end_round": 0,
    }
    assert data["rounds"] == 12 and data["optimizer"] == "sgd"
    assert config.run_dir == Path("runs") / "exp-1"


@pytest.mark.parametrize("structure", ["2", "4:2", "a:b", "0:4", "2:2"])
def test_bad_structure_names_the_value(structure: str) -> None:
    with pytest.raises(ConfigError, match=f"structure must be M:N.*{structure!r}"):
        ScheduleConfig(structure=structure)


def test_structured_run_needs_only_to_reach_its_begin_round() -> None:
    config = RunConfig(rounds=4, schedule=ScheduleConfig(structure="2:4", begin_round=2))

    assert config.schedule.m_by_n == (2, 4)


def test_downlink_in_the_runs_codec_needs_a_codec() -> None:
    with pytest.raises(ConfigError, match="--downlink codec sends changes in the run's codec"):
        RunConfig(downlink="codec")
    assert RunConfig(downlink="codec", codec="int8+top0.1").downlink == "codec"


@pytest.mark.parametrize(
    "changes",
    [{"min_clients": 2}, {"clients_per_round": 2, "min_clients": 5}, {"trim": 0.0}],
    ids=["two-devices", "two-drawn", "no-trim"],
)
def test_a_trimmed_mean_that_would_trim_nothing_is_refused(changes: dict[str, object]) -> None:
    values: dict[str, object] = {"aggregation": "trimmed-mean", "min_clients": 3, **changes}
    with pytest.raises(ConfigError, match="trims nothing: it would be the plain mean"):
        RunConfig(**values)  # type: ignore[arg-type]


def test_the_run_says_how_many_byzantine_devices_its_rule_tolerates() -> None:
    def of(**values: object) -> str:
        return str(config_summary(RunConfig(**values))["tolerates"])  # type: ignore[arg-type]

    assert of(aggregation="trimmed-mean", min_clients=3) == (
        "1 Byzantine device(s) of at least 3 a round"
    )
    assert of(aggregation="median", clients_per_round=10) == "4 Byzantine device(s) of 10 a round"
    assert of(min_clients=5).startswith("no Byzantine device of at least 5 a round (fedavg")


@pytest.mark.parametrize(
    ("values", "rule"),
    [
        ({}, "fedavg"),
        ({"signing_key": "c.sign", "device_keys": "keys"}, "median"),
        ({"signing_key": "c.sign", "device_keys": "keys", "heldout": "h.npz"}, "screened"),
        ({"signing_key": "c.sign", "device_keys": "keys", "aggregators": 2}, "fedavg"),
        ({"signing_key": "c.sign", "device_keys": "keys", "staleness_weight": 0.5}, "fedavg"),
        ({"signing_key": "c.sign", "device_keys": "keys", "aggregation": "fedavg"}, "fedavg"),
        ({"aggregation": "median"}, "median"),
    ],
    ids=[
        "open",
        "signed",
        "signed-heldout",
        "signed-aggregators",
        "signed-staleness",
        "signed-asked",
        "asked",
    ],
)
def test_auto_aggregation_is_robust_in_a_signed_fleet(values: dict[str, object], rule: str) -> None:
    config = RunConfig(**values)  # type: ignore[arg-type]
    assert config.aggregation == rule
    assert config.to_dict()["aggregation"] == rule  # config.toml: a resumed run keeps it


def test_the_run_says_what_updates_are_clipped_to() -> None:
    def of(**values: object) -> str:
        return str(config_summary(RunConfig(**values))["clip"])  # type: ignore[arg-type]

    assert of() == "3x the previous round's median norm"
    assert of(clip_norm=5.0) == "5"
    assert of(clip_multiple=0.0) == "off"
    with pytest.raises(ConfigError, match="clip_multiple must be >= 1"):
        RunConfig(clip_multiple=0.5)


def test_the_screened_rule_without_a_held_out_set_is_refused() -> None:
    with pytest.raises(ConfigError, match="screened measures each update on the held-out set"):
        RunConfig(aggregation="screened")
