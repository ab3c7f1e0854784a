"""fedprune-coordinator's bad input: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedprune.coordinator import demo
from fedprune.coordinator.cli import main, parse
from fedprune.coordinator.config import RunConfig, ScheduleConfig, ScheduleKind
from fedprune.coordinator.options import config_from
from fedprune.coordinator.rundir import RunDir


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--profile", "nope"], "unknown device profile 'nope'"),
        (["--rounds", "0"], "rounds must be >= 1, got 0"),
        (["--structure", "4:2"], "structure must be M:N"),
        (["--rounds", "5", "--end-round", "9"], "ends at round 9, after the last round 5"),
        (
            ["--broker", "mqtt://192.0.2.7:1883"],
            "the run is unsigned and the broker mqtt://192.0.2.7:1883 is not on this machine",
        ),
    ],
)
def test_bad_options_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(argv)

    assert code == 2
    line = _one_line(capsys)
    assert line.startswith("fedprune-coordinator: error: ") and message in line


def test_a_file_that_is_not_a_keras_model_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "model.keras"
    bad.write_text("not a model")

    code = main(["--model", str(bad), "--broker", "mqtt://127.0.0.1:1", "--out", str(tmp_path)])

    assert code == 2
    assert "not a Keras model file" in _one_line(capsys)


def test_a_run_config_file_sets_the_run_and_flags_override_it(tmp_path: Path) -> None:
    # Prepare: a config.toml as every run writes it, with other rounds and schedule
    config = RunConfig(
        run="garden",
        rounds=7,
        learning_rate=0.2,
        schedule=ScheduleConfig(kind=ScheduleKind.CONSTANT, target=0.5, begin_round=3),
    )
    RunDir(tmp_path / "garden").write_config(config)

    # Execute
    args = parse(["--config", str(tmp_path / "garden" / "config.toml"), "--rounds", "9"])
    resumed = parse(["--resume", str(tmp_path / "garden")])

    # Assert
    assert config_from(args) == dataclasses.replace(config, rounds=9)
    assert config_from(resumed) == dataclasses.replace(config, out=str(tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds = 'ten'\n", "rounds must be int, got 'ten'"),
        ("colour = 'red'\n", "unknown key 'colour'"),
        ("[schedule]\nkind = 'cubic'\n", "schedule must be one of polynomial, constant, mean"),
        ("rounds = \n", "not a readable TOML config file"),
    ],
)
def test_a_bad_config_file_is_a_one_line_error(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.toml").write_text(text)

    code = main(["--config", str(tmp_path / "config.toml"), "--out", str(tmp_path)])

    assert code == 2
    assert message in _one_line(capsys)


def test_the_demo_on_an_unsigned_broker_elsewhere_needs_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = demo.main(["--broker", "mqtt://192.0.2.7:1883", "--out", str(tmp_path)])

    assert code == 2
    assert "--insecure runs it anyway" in _one_line(capsys)
