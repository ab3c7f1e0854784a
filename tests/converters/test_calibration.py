"""Full-int8 calibration samples: chosen by content, kept apart from the scored samples, recorded.

Issue 8 (B): the run directory's heldout.npz is a shuffled copy of ``--heldout``; calibrating on
"the first 200 rows" made the coordinator's export and ``fedprune-export --data`` of the same file
differ, and scoring the export on its own calibration samples flattered it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedprune.converters import export_run
from fedprune.converters.report import REPORT_FILE
from fedprune.converters.tflite import (
    calibration_subset,
    row_digests,
    samples_sha256,
    split_calibration,
)
from fedprune.protocol.errors import ConfigError

RunFactory = Callable[..., Path]


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 8, 8, 1), dtype=np.float32)


def test_calibration_rows_depend_on_the_rows_not_on_their_order() -> None:
    # Prepare
    x = _rows(500)
    order = np.random.default_rng(1).permutation(len(x))

    # Execute
    subset, shuffled_subset = calibration_subset(x), calibration_subset(x[order])
    split, shuffled_split = split_calibration(x), split_calibration(x[order])

    # Assert: the same rows in the same order, and the same rows left for scoring
    assert subset.shape == (200, 8, 8, 1)
    np.testing.assert_array_equal(subset, shuffled_subset)
    np.testing.assert_array_equal(split.calibration, shuffled_split.calibration)
    np.testing.assert_array_equal(split.evaluate[order], shuffled_split.evaluate)


def test_calibration_and_scored_rows_are_disjoint_even_with_duplicate_rows() -> None:
    # Prepare: 300 distinct rows, the first 100 of them twice
    distinct = _rows(300)
    x = np.concatenate([distinct, distinct[:100]])

    # Execute
    split = split_calibration(x)

    # Assert
    calibrated = set(row_digests(split.calibration))
    scored = row_digests(x[split.evaluate])
    assert len(split.calibration) == len(calibrated) == 60  # 20% of the 300 distinct rows
    assert calibrated.isdisjoint(scored)
    assert calibrated | set(scored) == set(row_digests(x))
    duplicates = sum(d in calibrated for d in row_digests(x[300:]))
    assert int(split.evaluate.sum()) == len(x) - 60 - duplicates


def test_calibration_rows_are_the_smallest_digests_at_most_200() -> None:
    # Prepare
    x = _rows(2_000)

    # Execute
    split = split_calibration(x)

    # Assert: 20% of 2,000 would be 400; the cap is 200, taken in digest order
    digests = row_digests(split.calibration)
    assert len(digests) == 200
    assert digests == sorted(row_digests(x))[:200]
    assert int(split.evaluate.sum()) == 1_800


def test_split_of_fewer_than_two_distinct_rows_is_a_one_line_config_error() -> None:
    # Prepare
    x = np.zeros((5, 8, 8, 1), np.float32)

    # Execute
    with pytest.raises(ConfigError) as caught:
        split_calibration(x)

    # Assert
    message = str(caught.value)
    assert message.startswith("full_int8 calibration needs at least 2 distinct held-out samples")
    assert "got 1" in message and "\n" not in message


def test_the_set_digest_ignores_row_order_and_dtype() -> None:
    # Prepare
    x = _rows(50)

    # Execute
    digests = {samples_sha256(x), samples_sha256(x[::-1]), samples_sha256(x.astype(np.float64))}

    # Assert
    assert len(digests) == 1
    assert samples_sha256(x[1:]) not in digests


def _shuffled_copy(source: Path, target: Path) -> Path:
    with np.load(source) as npz:
        order = np.random.default_rng(7).permutation(len(npz["y"]))
        np.savez(target, x=npz["x"][order].reshape(len(order), -1), y=npz["y"][order])
    return target


@pytest.mark.slow
def test_a_shuffled_copy_of_the_held_out_file_gives_a_byte_identical_full_int8_export(
    make_run: RunFactory, tmp_path: Path
) -> None:
    # Prepare: the same samples in another order (and flattened, as a user's --heldout may be)
    run = make_run()
    shuffled = _shuffled_copy(run / "heldout.npz", tmp_path / "shuffled.npz")

    # Execute
    first = export_run(run, profile="raspberry-pi-3b")
    first_bytes = first.model_path.read_bytes()
    second = export_run(run, profile="raspberry-pi-3b", data=shuffled)

    # Assert
    assert second.model_path.read_bytes() == first_bytes
    assert second.sha256 == first.sha256
    assert second.calibration is not None and first.calibration is not None
    assert second.calibration.sha256 == first.calibration.sha256
    assert (second.n_eval, second.tflite_accuracy, second.keras_accuracy) == (
        first.n_eval,
        first.tflite_accuracy,
        first.keras_accuracy,
    )
    assert (first.calibration.source, second.calibration.source) == (
        run / "heldout.npz",
        shuffled,
    )


@pytest.mark.slow
def test_full_int8_export_records_its_calibration_rows_and_scores_only_the_others(
    make_run: RunFactory,
) -> None:
    # Prepare
    run = make_run()
    with np.load(run / "heldout.npz") as npz:
        split = split_calibration(npz["x"])

    # Execute
    report = export_run(run, profile="raspberry-pi-zero-2w")

    # Assert
    saved = json.loads((report.model_path.parent / REPORT_FILE).read_text())
    assert len(split.calibration) == 90  # 20% of the 450 held-out digits
    assert saved["n_eval"] == int(split.evaluate.sum()) <= 450 - 90
    assert saved["calibration"] == {
        "source": str(run / "heldout.npz"),
        "samples": 90,
        "rule": "20% of the distinct held-out rows (at most 200), those with the smallest SHA-256 "
        "of their float32 bytes; not scored, nor their duplicates",
        "sha256": samples_sha256(split.calibration),
    }
    assert abs(report.tflite_accuracy - report.keras_accuracy) <= 0.02


@pytest.mark.slow
def test_calibration_file_is_recorded_and_every_held_out_row_is_scored(
    make_run: RunFactory, tmp_path: Path
) -> None:
    # Prepare
    run = make_run()
    with np.load(run / "heldout.npz") as npz:
        samples = npz["x"][:50]
    np.savez(tmp_path / "calibration.npz", x=samples)

    # Execute
    report = export_run(run, profile="raspberry-pi-3b", calibration=tmp_path / "calibration.npz")

    # Assert
    assert report.n_eval == 450
    assert report.calibration is not None
    assert report.calibration.source == tmp_path / "calibration.npz"
    assert report.calibration.samples == len(set(row_digests(samples)))
    assert report.calibration.sha256 == samples_sha256(calibration_subset(samples))
    assert report.calibration.rule == (
        "at most 200 distinct rows of x, those with the smallest SHA-256 of their float32 bytes"
    )


@pytest.mark.slow
def test_other_precisions_score_every_held_out_row_and_record_no_calibration(
    make_run: RunFactory,
) -> None:
    # Prepare
    run = make_run()

    # Execute
    report = export_run(run, profile="jetson-nano")

    # Assert
    assert (report.precision, report.n_eval, report.calibration) == ("float16", 450, None)
