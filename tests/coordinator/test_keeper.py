"""``--keep best`` (keeper.py): the held-out split, and the round kept, written and put back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from results import round_result

from fedprune.coordinator import models, session
from fedprune.coordinator.config import RunConfig, ScheduleConfig
from fedprune.coordinator.keeper import Best, split
from fedprune.coordinator.pruning import Pruner, pruner_for
from fedprune.coordinator.result import RoundResult
from fedprune.coordinator.rundir import RunDir
from fedprune.protocol.errors import ConfigError


def result(round_: int, validation: float | None) -> RoundResult:
    return round_result(round_, validation=validation)


@pytest.fixture
def pruner() -> Pruner:
    schedule = ScheduleConfig(target=0.5, begin_round=0, end_round=2)
    pruner = pruner_for(models.build("mlp", seed=0), schedule)
    pruner.step(2)
    return pruner


def test_the_split_is_disjoint_whole_and_drawn_from_the_seed() -> None:
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10)

    (xv, yv), (xt, yt) = split(x, y, 0.3, seed=4)

    assert len(yv) == 3 and len(yt) == 7
    assert sorted([*yv, *yt]) == list(range(10))
    np.testing.assert_array_equal(xv[:, 0], 2 * yv)  # samples keep their labels
    again, _ = split(x, y, 0.3, seed=4)
    other, _ = split(x, y, 0.3, seed=5)
    assert list(again[1]) == list(yv) and list(other[1]) != list(yv)
    with pytest.raises(ConfigError, match="1 sample"):
        split(x[:1], y[:1], 0.5, seed=0)


def test_keep_best_needs_a_held_out_set() -> None:
    with pytest.raises(ConfigError, match="give --heldout"):
        RunConfig(keep="best")  # type: ignore[arg-type]


def test_the_best_eligible_round_is_kept_and_put_back(tmp_path: Path, pruner: Pruner) -> None:
    # Prepare: rounds 1-4 end with weights 1, 2, 3, 4 times the start; round 1 is before the
    # pruning target (eligible from 2) and scores best of all; round 3 is the best after it
    best = Best(tmp_path / "best.npz", eligible=2)
    start = pruner.stripped.get_weights()
    scores = {1: 0.99, 2: 0.80, 3: 0.90, 4: 0.85}
    for round_, score in scores.items():
        pruner.set_weights([w * round_ for w in start])
        best.saw(result(round_, score), pruner)
    best.saw(result(5, float("nan")), pruner)  # a diverged round is never the best
    best.saw(result(6, None), pruner)

    # Execute
    kept = best.load_into(pruner)

    # Assert
    assert kept == 3 and best.score == 0.90
    for got, want in zip(pruner.stripped.get_weights(), start, strict=True):
        np.testing.assert_allclose(got, 3 * want, rtol=1e-6)


def test_a_resumed_run_keeps_its_best_but_not_one_of_the_round_that_did_not_end(
    tmp_path: Path, pruner: Pruner
) -> None:
    path = tmp_path / "best.npz"
    Best(path, eligible=1).saw(result(4, 0.9), pruner)

    after_four, after_three = Best(path, eligible=1), Best(path, eligible=1)
    after_four.resume(done=4)
    after_three.resume(done=3)  # killed in round 4, after its best was written

    assert (after_four.round, after_four.score) == (4, 0.9)
    assert after_three.round == 0 and not path.exists()
    assert after_three.load_into(pruner) == 0


def test_a_new_run_forgets_an_earlier_runs_best(tmp_path: Path, pruner: Pruner) -> None:
    Best(tmp_path / "run" / "checkpoints" / "best.npz", eligible=1).saw(result(1, 0.9), pruner)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"round": 1}\n')

    RunDir(tmp_path / "run", overwrite=True)

    assert not (tmp_path / "run" / "checkpoints" / "best.npz").exists()


def test_only_rounds_at_the_pruning_target_are_eligible() -> None:
    assert ScheduleConfig(target=0.8, begin_round=2, end_round=12).at_target == 12
    assert ScheduleConfig(target=0.0).at_target == 1  # nothing pruned: every round
    hybrid = ScheduleConfig(target=0.5, units="l2", end_round=6, weight_target=0.5)  # type: ignore[arg-type]
    assert hybrid.at_target == hybrid.last_round == 10


def test_keep_best_reports_and_verifies_exports_on_the_test_share_only(
    tmp_path: Path, pruner: Pruner
) -> None:
    # Prepare: a held-out file of 40 labelled samples and a run that keeps the best round
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "h.npz", x=rng.random((40, 64), np.float32), y=np.arange(40) % 10)
    config = RunConfig(model="mlp", keep="best", heldout=str(tmp_path / "h.npz"), out=str(tmp_path))  # type: ignore[arg-type]
    rundir = RunDir(config.run_dir)

    # Execute
    x, y, choose = session._heldout(config, pruner, rundir)

    # Assert: heldout.npz (what exports are verified on) is the test share, apart from the
    # validation share that chooses
    assert choose is not None and x is not None and y is not None
    with (
        np.load(rundir.path / "heldout.npz") as test,
        np.load(rundir.path / "validation.npz") as val,
    ):
        assert list(test["y"]) == list(y) and len(y) == 20
        assert list(val["y"]) == list(choose[1]) and len(choose[1]) == 20
        together = np.concatenate([test["x"], val["x"]])
    assert sorted(map(tuple, together)) == sorted(map(tuple, np.load(tmp_path / "h.npz")["x"]))


def test_a_resumed_run_reads_its_own_shares_and_does_not_split_them_again(
    tmp_path: Path, pruner: Pruner
) -> None:
    # Prepare: a run that split its held-out set; resumed, it reads the run directory's copy
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "h.npz", x=rng.random((40, 64), np.float32), y=np.arange(40) % 10)
    first = RunConfig(model="mlp", keep="best", heldout=str(tmp_path / "h.npz"), out=str(tmp_path))  # type: ignore[arg-type]
    rundir = RunDir(first.run_dir)
    rundir.write_config(first)
    x, y, choose = session._heldout(first, pruner, rundir)
    resumed = RunConfig(
        model="mlp",
        keep="best",
        heldout=str(rundir.path / "heldout.npz"),
        out=str(tmp_path),  # type: ignore[arg-type]
    )

    # Execute
    x2, y2, choose2 = session._heldout(resumed, pruner, RunDir(first.run_dir, resume=True))

    # Assert: the same test share reports, the same validation share chooses
    assert choose is not None and choose2 is not None and x is not None and x2 is not None

    def rows(a: np.ndarray) -> list[tuple[float, ...]]:  # loading shuffles: compare the sets
        return sorted(map(tuple, a.reshape(len(a), -1)))

    assert rows(x2) == rows(x) and rows(choose2[0]) == rows(choose[0])
    assert len(y2) == len(y) == 20  # type: ignore[arg-type]
