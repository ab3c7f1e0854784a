"""The run directory keeps an earlier run unless told to replace it, and resumes one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from results import round_result

from fedprune.coordinator import models
from fedprune.coordinator.config import RunConfig, ScheduleConfig
from fedprune.coordinator.ledger import Ledger
from fedprune.coordinator.pruning import Pruner, pruner_for
from fedprune.coordinator.result import RoundResult
from fedprune.coordinator.rundir import RunDir
from fedprune.coordinator.scaffold import Control
from fedprune.coordinator.server_optimizer import ServerOptimizer
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import Hello


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


@pytest.fixture(scope="module")
def pruner() -> Pruner:
    schedule = ScheduleConfig(target=0.5, begin_round=0, end_round=2)
    pruner = pruner_for(models.build("mlp", seed=0), schedule)
    pruner.step(1)
    return pruner


def _result(round_: int) -> RoundResult:
    return round_result(round_)


@pytest.mark.parametrize("torn", [False, True])
def test_a_resumed_run_gets_the_checkpoint_and_drops_metrics_of_the_round_that_did_not_end(
    tmp_path: Path, pruner: Pruner, torn: bool
) -> None:
    # Prepare: round 1 checkpointed with a device in the ledger; round 2's metrics line written
    # (or half of it: killed while writing), and then the coordinator died before its checkpoint
    run = RunDir(tmp_path / "run")
    run.write_config(RunConfig())
    ledger = Ledger()
    ledger.hello(Hello(client_id="pi-1", profile="p", num_samples=5, backend="litert"))
    run.append(_result(1))
    run.checkpoint(1, pruner, ledger)
    run.append(_result(2))
    if torn:
        text = run.metrics.read_text()
        run.metrics.write_text(text[: len(text) - 40])
    saved = [w.copy() for w in pruner.wrapped.get_weights()]
    fresh = pruner_for(
        models.build("mlp", seed=1), ScheduleConfig(target=0.5, begin_round=0, end_round=2)
    )
    restored_ledger = Ledger()

    # Execute
    results = RunDir(tmp_path / "run", resume=True).restore(fresh, restored_ledger)

    # Assert: weights, masks and TF-MOT steps back; round 2 is to be run again
    assert [r.round for r in results] == [1]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
    for got, want in zip(fresh.wrapped.get_weights(), saved, strict=True):
        np.testing.assert_array_equal(got, want)
    (row,) = restored_ledger.rows()
    assert (row.id, row.samples, row.online) == ("pi-1", 5, False)


@pytest.mark.parametrize("weight_target", [0.0, 0.5], ids=["units", "hybrid"])
def test_a_rebuilt_model_resumes_with_its_smaller_architecture_and_schedule(
    tmp_path: Path, weight_target: float
) -> None:
    # Prepare: a unit-pruned cnn rebuilt at round 2 and checkpointed at round 3
    schedule = ScheduleConfig(
        units="l1", target=0.5, begin_round=1, end_round=2, weight_target=weight_target
    )
    pruner = pruner_for(models.build("cnn", seed=0), schedule)
    for round_ in (1, 2, 3):
        pruner.step(round_)
        if pruner.rebuild_due(round_):
            assert pruner.rebuild()
    run = RunDir(tmp_path / "run")
    run.write_config(RunConfig())
    for round_ in (1, 2, 3):
        run.append(_result(round_))
    run.checkpoint(3, pruner, Ledger())
    fresh = pruner_for(models.build("cnn", seed=1), schedule)

    # Execute
    RunDir(tmp_path / "run", resume=True).restore(fresh, Ledger())

    # Assert: the small model, its weights and masks; the schedule goes on as it would have
    assert fresh.parameters() == pruner.parameters() < models.cnn().count_params() // 3
    for got, want in zip(fresh.wrapped.get_weights(), pruner.wrapped.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    for p in (pruner, fresh):
        p.step(4)
    assert fresh.sparsity() == pruner.sparsity()
    assert (fresh.sparsity() > 0) == (weight_target > 0)


def test_resuming_what_is_not_a_run_or_a_broken_checkpoint_is_a_one_line_error(
    tmp_path: Path, pruner: Pruner
) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        RunDir(tmp_path / "nothing", resume=True)
    run = RunDir(tmp_path / "run")
    run.write_config(RunConfig())
    (tmp_path / "run" / "checkpoints" / "round-0001.npz").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot resume from this checkpoint"):
        RunDir(tmp_path / "run", resume=True).restore(pruner, Ledger())


def test_the_server_optimizers_and_scaffolds_state_come_back_with_the_checkpoint(
    tmp_path: Path, pruner: Pruner
) -> None:
    # Prepare: a server Adam and a SCAFFOLD variate that took a round each, checkpointed
    model = pruner.model()
    adam, control = ServerOptimizer("adam"), Control()
    delta = [np.full(w.shape, 0.01) for w in model.weights]
    adam.step(model, delta)
    control.payload(model)
    control.add(delta)
    control.close(model, fleet=2)
    run = RunDir(tmp_path / "run")
    run.write_config(RunConfig())
    run.append(_result(1))
    run.checkpoint(1, pruner, Ledger(), {"server_": adam, "control_": control})
    again_adam, again_control = ServerOptimizer("adam"), Control()

    # Execute
    RunDir(tmp_path / "run", resume=True).restore(
        pruner, Ledger(), {"server_": again_adam, "control_": again_control}
    )

    # Assert: the next step is the one the uninterrupted run takes
    assert again_adam.state().keys() == adam.state().keys() != set()
    want, got = adam.step(model, delta), again_adam.step(model, delta)
    for a, b in zip(want, got, strict=True):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(control.c, again_control.c, strict=True):
        np.testing.assert_array_equal(a, b)
