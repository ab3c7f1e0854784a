"""fedprune-coordinator's bad input: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedprune.coordinator.cli import main


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
