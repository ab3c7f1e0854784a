"""``fedprune-report``: plots and an HTML page from a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import tomli_w

from fedprune.coordinator.report import main


def _run_dir(tmp_path: Path, rounds: int = 4) -> Path:
    run = tmp_path / "runs" / "lab-7"
    (run / "export" / "raspberry-pi-4").mkdir(parents=True)
    (run / "config.toml").write_text(
        tomli_w.dumps({"run": "lab-7", "rounds": rounds, "schedule": {"target": 0.8}})
    )
    lines = [
        {
            "round": r,
            "accuracy": 0.5 + 0.1 * r,
            "loss": 1.0 / r,
            "client_accuracy": 0.5,
            "client_loss": 0.9,
            "sparsity": 0.2 * r,
            "bytes_up": 1000 * r,
            "bytes_down": 2000,
            "dense_bytes_up": 5000,
            "dense_bytes_down": 5000,
            "selected": 2,
            "reported": 2,
            "rejected": {"norm": 1} if r == 2 else {},
            "seconds": 1.5,
        }
        for r in range(1, rounds + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    devices = [
        {"id": "pi-<1>", "selected": 4, "reported": 3, "late": 1, "rejected": 0},
        {"id": "pi-2", "selected": 4, "reported": 4, "late": 0, "rejected": 1},
    ]
    (run / "devices.json").write_text(json.dumps({"devices": devices, "events": []}))
    export = {
        "precision": "dynamic_int8",
        "tflite_bytes": 137720,
        "gzip_bytes": 47383,
        "tflite_accuracy": 0.9755,
        "keras_accuracy": 0.9755,
        "latency_ms_p50": 0.016,
        "latency_ms_p95": 0.025,
        "runtime": "default interpreter (XNNPACK)",
    }
    (run / "export" / "raspberry-pi-4" / "export.json").write_text(json.dumps(export))
    return run


def test_the_report_has_every_plot_and_the_run_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path)

    code = main([str(run)])

    assert code == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report' / 'index.html'}"
    page = (run / "report" / "index.html").read_text()
    for name in ("accuracy.png", "sparsity.png", "bytes.png", "participation.png"):
        image = matplotlib.image.imread(run / "report" / name)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert f'src="{name}"' in page
    for figure in (
        "0.9000",
        "0.8000",
        "10,000 / 20,000 bytes",
        "raspberry-pi-4",
        "137720",
        "dynamic_int8",
        "0.9755",
        "schedule.target",
    ):
        assert figure in page, figure
    assert "pi-<1>" not in page  # device names are escaped (plots hold them as pixels)


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(tmp_path)])

    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err == [
        f"fedprune-report: error: {tmp_path}: not a run directory (no metrics.jsonl)"
    ]


def test_a_garbled_metrics_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path)
    (run / "metrics.jsonl").write_text("{not json\n")

    code = main([str(run)])

    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "unreadable run file" in err[0]


def test_a_metrics_line_without_a_field_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path)
    (run / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.5}\n')

    code = main([str(run)])

    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].endswith(
        "metrics.jsonl:1: no sparsity, bytes_up, bytes_down, dense_bytes_up,"
        " dense_bytes_down, seconds"
    )


@pytest.mark.parametrize("count", [3, 1500])
def test_devices_named_like_math_and_large_fleets_are_plotted(tmp_path: Path, count: int) -> None:
    run = _run_dir(tmp_path)
    devices = [
        {"id": f"pi-$x^{i}$", "selected": 4, "reported": i % 5, "late": 0, "rejected": 0}
        for i in range(count)
    ]
    (run / "devices.json").write_text(json.dumps({"devices": devices, "events": []}))

    assert main([str(run)]) == 0

    image = matplotlib.image.imread(run / "report" / "participation.png")
    assert 200 < image.shape[1] < 3000


def test_an_autoencoders_report_gives_its_auc_where_a_classifiers_gives_accuracy(
    tmp_path: Path,
) -> None:
    # Prepare: a reconstruction's run: no accuracy, an AUC per round and for its export
    run = _run_dir(tmp_path)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r, line in enumerate(lines, start=1):
        line.update(accuracy=None, client_accuracy=None, auc=0.6 + 0.08 * r)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    export_json = run / "export" / "raspberry-pi-4" / "export.json"
    export = json.loads(export_json.read_text())
    export.update(tflite_accuracy=None, keras_accuracy=None, tflite_auc=0.9123, keras_auc=0.9134)
    export_json.write_text(json.dumps(export))

    # Execute
    code = main([str(run)])

    # Assert
    page = (run / "report" / "index.html").read_text()
    assert code == 0
    assert "final held-out AUC" in page and "0.9200" in page
    assert "0.9123" in page and "0.9134" in page
