"""fedprune as users install it: one import name, a wheel that holds every file the code reads,
and the device's commands working from a wheel installed into a fresh virtual environment."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fedprune
from fedprune.monitor.dashboard import ASSETS

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PROJECT["tool"]["setuptools"]["package-dir"]
SCRIPTS: dict[str, str] = PROJECT["project"]["scripts"]
DEVICE_COMMANDS = ("fedprune-client", "fedprune-infer", "fedprune-profiles", "fedprune-monitor")


def _source_files() -> set[str]:
    """Every file of the package folders, named as installed (``fedprune/protocol/...``)."""
    names = set()
    for package, folder in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*"):
            inside = path.relative_to(ROOT / folder)
            if path.is_file() and "__pycache__" not in inside.parts:
                names.add("/".join([*package.split("."), *inside.parts]))
    return names


def test_every_package_installs_under_the_fedprune_name() -> None:
    # Assert: one top-level name, one folder per role
    assert set(PACKAGE_DIRS) == {
        "fedprune",
        "fedprune.coordinator",
        "fedprune.converters",
        "fedprune.device_profiles",
        "fedprune.edge_client",
        "fedprune.monitor",
        "fedprune.protocol",
    }
    assert all(target.startswith("fedprune.") for target in SCRIPTS.values())
    assert fedprune.__version__ == importlib.metadata.version("fedprune")


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_command_prints_its_version(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    module, function = SCRIPTS[command].split(":")
    main = getattr(importlib.import_module(module), function)

    # Execute: argparse's version action exits 0 (some mains turn that into a return value)
    try:
        code = main(["--version"])
    except SystemExit as exc:
        code = exc.code

    # Assert
    assert code in (0, None)
    assert capsys.readouterr().out == f"{command} {fedprune.__version__}\n"


@pytest.mark.slow
def test_the_wheel_holds_every_file_of_the_package_folders_and_nothing_else(wheel: Path) -> None:
    # Execute
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    metadata = {n for n in names if n.split("/", 1)[0].endswith(".dist-info")}

    # Assert: data files the code reads (profiles, typed markers) are there, with every module
    assert names - metadata == _source_files()
    profiles = {
        n for n in names if n.startswith("fedprune/device_profiles/") and n.endswith(".toml")
    }
    assert len(profiles) == 7
    assert {n for n in names if n.endswith("py.typed")} == {
        f"{package.replace('.', '/')}/py.typed" for package in PACKAGE_DIRS
    }
    assert {n.split("/", 1)[0] for n in metadata} == {f"fedprune-{fedprune.__version__}.dist-info"}
    web = {
        n.removeprefix("fedprune/monitor/web-assets/").removesuffix(".gz")
        for n in names
        if n.startswith("fedprune/monitor/web-assets/")
    }
    assert set(ASSETS) <= web  # the dashboard's page and its assets


@pytest.mark.slow
@pytest.mark.integration
def test_the_wheel_installs_the_device_commands_without_tensorflow(
    edge_venv: Path, tmp_path: Path
) -> None:
    # Prepare
    data = tmp_path / "local.npz"
    np.savez(data, x=np.zeros((10, 64), np.float32), y=np.arange(10) % 3)

    # Execute: from a folder outside the checkout, with the wheel's venv only
    def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(c) for c in command], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )

    versions = [run(edge_venv / name, "--version").stdout for name in DEVICE_COMMANDS]
    probe = run(
        edge_venv / "python",
        "-c",
        "import importlib.util as u, json, fedprune, fedprune.edge_client.cli;"
        "print(json.dumps({'version': fedprune.__version__, 'file': fedprune.__file__,"
        " 'missing': [m for m in ('tensorflow', 'edge_client', 'coordinator', 'converters',"
        " 'device_profiles', 'protocol', 'monitor', 'fedprune.coordinator')"
        " if u.find_spec(m) is None]}))",
    )
    profiles = run(edge_venv / "fedprune-profiles", "list")
    keras = run(edge_venv / "fedprune-client", "--data", data, "--broker", "mqtt://127.0.0.1:9")

    # Assert: the wheel's code, no TensorFlow, no top-level role names; every command answers
    assert versions == [f"{name} {fedprune.__version__}\n" for name in DEVICE_COMMANDS]
    facts = json.loads(probe.stdout)
    assert facts["version"] == fedprune.__version__
    assert Path(facts["file"]).is_relative_to(edge_venv.parent)
    # The coordinator subpackage is in the wheel too; only its dependencies are not installed.
    assert facts["missing"] == [
        "tensorflow",
        "edge_client",
        "coordinator",
        "converters",
        "device_profiles",
        "protocol",
        "monitor",
    ]
    assert profiles.returncode == 0 and len(profiles.stdout.splitlines()) == 1 + 7
    assert keras.returncode == 2
    assert keras.stderr.strip().splitlines() == [
        "fedprune-client: error: trainer 'keras' needs tensorflow, which is not installed;"
        " install it or choose another backend"
    ]


@pytest.mark.slow
@pytest.mark.integration
def test_devices_installed_from_the_wheel_train_in_a_real_run_and_run_the_deployed_model(
    edge_venv: Path, mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: the coordinator from the development install; two litert devices from the wheel
    from fedprune.coordinator import digits

    paths, heldout = digits.write_demo_data(tmp_path / "data", 2, alpha=100.0, seed=0)
    coordinator = subprocess.Popen(
        [
            Path(sys.executable).parent / "fedprune-coordinator",
            "--broker",
            mosquitto,
            "--run",
            "wheel",
            "--min-clients",
            "2",
            "--rounds",
            "3",
            "--begin-round",
            "1",
            "--end-round",
            "2",
            "--heldout",
            heldout,
            "--out",
            tmp_path / "runs",
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Execute
    def device(i: int, data: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                edge_venv / "fedprune-client",
                "--broker",
                mosquitto,
                "--run",
                "wheel",
                "--id",
                f"pi-{i}",
                "--data",
                data,
                "--profile",
                "raspberry-pi-4",
                "--models",
                tmp_path / f"pi-{i}",
                "--cache",
                tmp_path / f"cache-{i}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )

    devices = [device(i, path) for i, path in enumerate(paths)]
    logs = [device.communicate(timeout=300)[0] for device in devices]
    _, err = coordinator.communicate(timeout=300)
    installed = tmp_path / "pi-0" / "raspberry-pi-4"
    monitor = subprocess.run(
        [
            edge_venv / "fedprune-monitor",
            "--broker",
            mosquitto,
            "--run",
            "wheel",
            "--once",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    infer = subprocess.run(
        [edge_venv / "fedprune-infer", installed, "--data", heldout, "--json", "--runs", "5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )

    # Assert: both devices trained every round with LiteRT alone and run what was deployed
    assert [d.returncode for d in devices] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert coordinator.returncode == 0, err[-3000:]
    rounds = [json.loads(line) for line in (tmp_path / "runs" / "wheel" / "metrics.jsonl").open()]
    assert [r["reported"] for r in rounds] == [2, 2, 2]
    assert [r["codecs"] for r in rounds] == [{"int8": 2}] * 3  # the Pi 4 profile's codec
    assert not any("change cannot be used" in log for log in logs)  # models 2 and 3 as changes
    assert all("TensorFlow loaded: no" in log for log in logs)
    assert infer.returncode == 0, infer.stderr
    meta = json.loads((installed / "export.json").read_text())
    assert json.loads(infer.stdout)["accuracy"] >= meta["keras_accuracy"] - 0.02
    # The monitor from the wheel: the finished run, every device and the model it runs
    assert monitor.returncode == 0, monitor.stderr
    snapshot = json.loads(monitor.stdout)
    assert (snapshot["coordinator"], snapshot["run"]["phase"]) == ("finished", "finished")
    assert [(d["id"], d["reported"], d["model"]) for d in snapshot["devices"]] == [
        (f"pi-{i}", 3, meta["sha256"]) for i in range(2)
    ]


@pytest.mark.slow
@pytest.mark.integration
def test_a_device_without_zstandard_is_told_and_not_selected_when_the_run_forces_it(
    edge_venv: Path, mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: a run that forces a zstandard codec; a device from the wheel without the extra
    from fedprune.coordinator import digits

    paths, heldout = digits.write_demo_data(tmp_path / "data", 1, alpha=100.0, seed=0)
    coordinator = subprocess.Popen(
        [
            Path(sys.executable).parent / "fedprune-coordinator",
            "--broker",
            mosquitto,
            "--run",
            "zstd",
            "--min-clients",
            "1",
            "--rounds",
            "2",
            "--begin-round",
            "1",
            "--end-round",
            "2",
            "--heldout",
            heldout,
            "--out",
            tmp_path / "runs",
            "--codec",
            "int8+zstd",
            "--join-timeout",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Execute
    device = subprocess.run(
        [
            edge_venv / "fedprune-client",
            "--broker",
            mosquitto,
            "--run",
            "zstd",
            "--id",
            "pi-0",
            "--data",
            paths[0],
            "--profile",
            "raspberry-pi-4",
            "--cache",
            tmp_path / "cache",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    _, err = coordinator.communicate(timeout=120)
    assert "client pi-0 joined" in err, err[-3000:]

    # Assert: the device stops with one line saying what to install; the coordinator never
    # selected it and says why
    assert device.returncode == 2
    assert device.stderr.strip().splitlines()[-1] == (
        "fedprune-client: error: run 'zstd' sends updates as int8+zstd, which needs zstd"
        " (pip install 'fedprune[edge,zstd]')"
    )
    assert "client pi-0 joined" in err and "needs zstd, which this device lacks" in err
    assert coordinator.returncode != 0
