"""``fedprune-export``: one line per profile, exit 0 / 4, one-line errors on bad input."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedprune.converters.cli import main
from fedprune.device_profiles import available
from fedprune.protocol.errors import ConfigError, ExportError

RunFactory = Callable[..., Path]


@pytest.mark.slow
def test_default_profile_prints_one_summary_line_and_exits_0(
    make_run: RunFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run()

    code = main([str(run)])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(out) == 1
    assert out[0].startswith("generic-x86-64  float32 ")
    assert "LiteRT accuracy 0." in out[0] and "(Keras 0." in out[0]
    threads = min(8, os.cpu_count() or 1)  # the profile's 8 cores, capped by this machine's
    assert "latency p50 " in out[0] and f"({threads} threads)" in out[0]
    assert out[0].endswith(str(run / "export" / "generic-x86-64" / "model.tflite"))


@pytest.mark.slow
def test_refused_profile_prints_refused_and_exits_4(
    make_run: RunFactory, write_profile: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run()
    tiny = write_profile("tiny-device", max_model_bytes=1_000)

    code = main([str(run), "--profile", str(tiny), "raspberry-pi-4"])

    out = capsys.readouterr().out.splitlines()
    assert code == ExportError.exit_code == 4
    assert len(out) == 2
    assert out[0].startswith("tiny-device     refused: the float32 model is ")
    assert out[0].endswith("over max_model_bytes 1,000; nothing written")
    assert out[1].startswith("raspberry-pi-4  dynamic_int8")
    assert sorted(p.name for p in (run / "export").iterdir()) == ["raspberry-pi-4"]


@pytest.mark.slow
def test_export_reports_which_of_the_profiles_budgets_it_meets(
    make_run: RunFactory, write_profile: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a latency budget any machine meets for this small CNN, a size budget it cannot
    run = make_run()
    budgeted = write_profile("budgeted", latency_budget_ms=1000.0, size_budget_bytes=1_000)

    code = main([str(run), "--profile", str(budgeted)])

    # Assert: exported (budgets are targets, not limits), and the line and export.json say so
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "budgets: latency met (" in out[0] and "vs 1000.000 ms), size MISSED (" in out[0]
    report = json.loads((run / "export" / "budgeted" / "export.json").read_text())
    latency, size = report["budgets"]
    assert latency == {
        "name": "latency_ms",
        "limit": 1000.0,
        "measured": report["latency_ms_p50"],
        "met": True,
    }
    assert size == {
        "name": "size_bytes",
        "limit": 1000,
        "measured": report["tflite_bytes"],
        "met": False,
    }


@pytest.mark.slow
def test_all_profiles_exports_every_shipped_profile(
    make_run: RunFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run()

    code = main([str(run), "--all-profiles"])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split()[0] for line in out] == available()
    assert sorted(p.name for p in (run / "export").iterdir()) == available()


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["{run}", "--profile", "no-such-board"], "unknown device profile 'no-such-board'"),
        (["{run}", "--data", "{tmp}/absent.npz"], "absent.npz: no such data file"),
        (["{run}", "--calibration", "{tmp}/absent.npz"], "absent.npz: no such data file"),
        (["{tmp}/nowhere"], "nowhere: not a run directory"),
    ],
    ids=["profile", "data", "calibration", "run-dir"],
)
def test_bad_input_is_one_error_line_and_exit_2(
    make_run: RunFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    reason: str,
) -> None:
    run = make_run()

    code = main([a.format(run=run, tmp=tmp_path) for a in args])

    captured = capsys.readouterr()
    assert code == ConfigError.exit_code == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("fedprune-export: error: ")
    assert reason in captured.err
    assert not (run / "export").exists()


@pytest.mark.parametrize(
    "args", [[], ["run", "--all-profiles", "--profile", "jetson-nano"], ["run", "--bogus"]]
)
def test_usage_errors_are_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(args)

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("fedprune-export: error: ")
