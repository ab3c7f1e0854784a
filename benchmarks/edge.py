"""Benchmark the edge client as a device runs it: install size, start-up, memory, training time.

    .venv/bin/python benchmarks/edge.py [--rounds 6] [--repeats 3]

1. Installs ``.[edge]`` into a fresh virtual environment (no TensorFlow) and measures its size,
   whole and without pip and setuptools (the budget); the same for ``.[monitor]``.
2. Starts a private mosquitto and, per repeat and per trainer (litert from the edge environment,
   keras from the project's .venv), a coordinator with one client on the same digits data: the time
   from launching the client process to its retained hello reaching a separate subscriber
   ("connected and ready"), its peak memory (ru_maxrss, from the client's own last log line) and
   the local training time per round (from its log lines).
Prints Markdown tables of medians; every figure is measured by this run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from fedprune.coordinator import digits
from fedprune.coordinator.broker import EmbeddedBroker
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def edge_venv(where: Path, extras: str = "edge") -> Path:
    venv.create(where, with_pip=True)
    subprocess.run(
        [
            where / "bin" / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            f"{ROOT}[{extras}]",
        ],
        check=True,
    )
    return where


PIP_ITSELF = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")


def packages_mb(env_dir: Path) -> float:
    """The installed packages, without pip and setuptools (what the project's budget counts)."""
    (site,) = env_dir.glob("lib/python*/site-packages")
    kept = [p for p in site.iterdir() if not p.name.startswith(PIP_ITSELF)]
    return sum(folder_mb(p) if p.is_dir() else p.stat().st_size / 1e6 for p in kept)


def one_client(
    url: str,
    run: str,
    python: Path,
    profile: str,
    data: Path,
    heldout: Path,
    rounds: int,
    work: Path,
) -> dict[str, float]:
    coordinator = subprocess.Popen(
        [
            BIN / "fedprune-coordinator",
            "--broker",
            url,
            "--run",
            run,
            "--min-clients",
            "1",
            "--rounds",
            str(rounds),
            "--begin-round",
            "1",
            "--end-round",
            str(rounds - 1),
            "--heldout",
            str(heldout),
            "--out",
            str(work / "runs"),
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    watcher = MqttTransport(url, client_id=f"watch-{run}")
    watcher.subscribe(Topics(run).client_status("device"))
    log = work / f"{run}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        client = subprocess.Popen(
            [
                python,
                "-m",
                "fedprune.edge_client",
                "--broker",
                url,
                "--run",
                run,
                "--id",
                "device",
                "--data",
                str(data),
                "--profile",
                profile,
                "--cache",
                str(work / "cache"),
                "--models",
                str(work / "models"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        hello = watcher.get(timeout=60)
        ready = time.perf_counter() - started
        client.wait(timeout=600)
        coordinator.wait(timeout=600)
    watcher.close()
    text = log.read_text()
    assert hello is not None and client.returncode == 0, text[-2000:]
    train = [float(s) for s in re.findall(r"samples in ([0-9.]+) s", text)]
    peak = float(re.findall(r"peak memory ([0-9.]+) MB", text)[-1])
    return {
        "ready s": ready,
        "peak MB": peak,
        "train s/round, first": train[0],
        "train s/round, median of the rest": statistics.median(train[1:]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env_dir = edge_venv(work / "edge-venv")
        size, packages = folder_mb(env_dir), packages_mb(env_dir)
        monitor = edge_venv(work / "monitor-venv", "monitor")
        monitor_size, monitor_packages = folder_mb(monitor), packages_mb(monitor)
        paths, heldout = digits.write_demo_data(work / "data", 2, alpha=100.0, seed=0)
        trainers = {
            "litert (edge venv, no TensorFlow)": (env_dir / "bin" / "python", "raspberry-pi-4"),
            "keras (.venv with TensorFlow)": (BIN / "python", "generic-x86-64"),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
        with EmbeddedBroker("mosquitto") as broker:
            for repeat in range(args.repeats):
                for i, (name, (python, profile)) in enumerate(trainers.items()):
                    run = f"edge-{repeat}-{i}"
                    shutil.rmtree(work / "cache", ignore_errors=True)
                    results[name].append(
                        one_client(
                            broker.url, run, python, profile, paths[0], heldout, args.rounds, work
                        )
                    )
    print(
        f"edge venv (`pip install .[edge]`): {size:.1f} MB on disk, {packages:.1f} MB of packages"
        f" without pip and setuptools; monitor venv (`.[monitor]`): {monitor_size:.1f} MB,"
        f" {monitor_packages:.1f} MB of packages; the project's .venv with TensorFlow:"
        f" {folder_mb(ROOT / '.venv'):.0f} MB\n"
    )
    print(
        f"median of {args.repeats} run(s), {args.rounds} rounds, "
        f"{sum(1 for _ in paths)} data files, client 0's data\n"
    )
    keys = list(next(iter(results.values()))[0])
    print("| trainer | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, runs in results.items():
        cells = [f"{statistics.median(r[k] for r in runs):.3f}" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
