"""The run directory keeps an earlier run unless told to replace it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedprune.coordinator.rundir import RunDir
from fedprune.edge_client.errors import ConfigError


def test_an_earlier_run_is_kept_unless_overwrite_is_given(tmp_path: Path) -> None:
    # Prepare: an earlier run with one metrics line and an export
    earlier = tmp_path / "run"
    RunDir(earlier)
    (earlier / "metrics.jsonl").write_text('{"round": 1}\n')
    (earlier / "export" / "p").mkdir(parents=True)

    # Execute / Assert: refused, and nothing was touched
    with pytest.raises(ConfigError, match="holds an earlier run.*--overwrite"):
        RunDir(earlier)
    assert (earlier / "metrics.jsonl").read_text() == '{"round": 1}\n'

    # Execute / Assert: replaced on request, stale exports included
    RunDir(earlier, overwrite=True)
    assert (earlier / "metrics.jsonl").read_text() == ""
    assert not (earlier / "export").exists()
