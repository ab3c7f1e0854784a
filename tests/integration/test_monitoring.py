"""Monitoring a real run: mosquitto, the demo's coordinator and three device processes, watched
through every window an operator has while it runs (the monitor's JSON and its terminal view, the
web dashboard in a real headless chromium, the Prometheus endpoint), then the run report.

The dashboard's screenshot and the terminal view's SVG are kept in ``test-artifacts/``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
RUN = "watched"
CLIENTS = ["client-0", "client-1", "client-2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bytes(response.read())
    except (urllib.error.URLError, ConnectionError):
        return None


def _snapshot_when(url: str, ready: Any, process: subprocess.Popen[str], timeout: float) -> Any:
    """The dashboard's snapshot once ``ready(snapshot)`` holds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert process.poll() is None, "the run ended before it could be watched"
        body = _get(url + "snapshot.json")
        if body is not None and ready(snapshot := json.loads(body)):
            return snapshot
        time.sleep(0.2)
    pytest.fail(f"the run did not get there within {timeout} s")


class DeviceRows(HTMLParser):
    """The device table's rows and the charts' plotted points, from chromium's dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.points: dict[str, Any] = {}
        self.body: dict[str, str] = {}
        self._row: str | None = None
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = {k: v or "" for k, v in a.items()}
        if tag == "tr" and a.get("data-device"):
            self._row = a["data-device"]
            self.rows[self._row] = []
        if tag == "td" and self._row is not None:
            self._in_cell = True
            self.rows[self._row].append("")
        if tag == "canvas" and a.get("data-points"):
            self.points[str(a["id"])] = json.loads(str(a["data-points"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_cell and self._row is not None:
            self.rows[self._row][-1] += data


def _chromium(url: str, *flags: str) -> list[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: scripts/test.sh installs Debian's chromium")
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1400,1300",
        "--timeout=5000",
        *flags,
        url,
    ]


def _all_at_once(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands side by side (the run goes on meanwhile); each one's outcome."""
    started = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for c in commands]  # fmt: skip
    done = []
    for command, process in zip(commands, started, strict=True):
        out, err = process.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return done


def test_a_running_fleet_is_visible_in_the_monitor_the_dashboard_and_prometheus(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: a run slow enough to be watched while it goes (many local epochs per round).
    ARTIFACTS.mkdir(exist_ok=True)
    web, metrics_port = _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{web}/"
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedprune.coordinator.demo", "--broker", mosquitto,
         "--run", RUN, "--out", str(tmp_path), "--clients", "3", "--rounds", "8",
         "--end-round", "6", "--local-epochs", "60",
         "--dashboard", f"127.0.0.1:{web}", "--metrics-port", f"127.0.0.1:{metrics_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # Execute, while the run goes: from round 3 on, every window at once.
        during = _snapshot_when(
            dashboard, lambda s: s["run"]["phase"] == "training" and s["run"]["round"] >= 3,
            demo, timeout=300,
        )  # fmt: skip
        scrape = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        monitor_command = [sys.executable, "-m", "fedprune.edge_client.monitor",
                           "--broker", mosquitto, "--run", RUN, "--once"]  # fmt: skip
        monitor, view, dom, shot = _all_at_once([
            [*monitor_command, "--json"],
            [*monitor_command, "--svg", str(ARTIFACTS / "monitor.svg")],
            _chromium(dashboard, "--dump-dom"),
            _chromium(dashboard, f"--screenshot={ARTIFACTS / 'dashboard.png'}"),
        ])  # fmt: skip
        running = demo.poll() is None
        out, _ = demo.communicate(timeout=600)
    finally:
        if demo.poll() is None:
            demo.kill()
    run_dir = tmp_path / RUN
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # Assert: the run itself, and that the windows were looked through while it went
    assert demo.returncode == 0, out[-3000:]
    assert running and len(rounds) == 8

    # The monitor: one JSON snapshot of the running run, its rounds as metrics.jsonl has them
    assert monitor.returncode == 0, monitor.stderr
    snapshot = json.loads(monitor.stdout)
    assert snapshot["coordinator"] == "online" and snapshot["run"]["name"] == RUN
    assert snapshot["run"]["phase"] == "training" and 3 <= snapshot["run"]["round"] <= 8
    assert [d["id"] for d in snapshot["devices"]] == CLIENTS
    assert all(d["online"] and d["reported"] >= 2 for d in snapshot["devices"])
    assert snapshot["rounds"] == rounds[: len(snapshot["rounds"])] and snapshot["rounds"]
    assert view.returncode == 0, view.stderr
    svg = (ARTIFACTS / "monitor.svg").read_text()
    assert all(c in svg for c in CLIENTS) and RUN in svg

    # The dashboard in chromium: no console errors; the table and the charts show the run
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() + shot.stderr.splitlines()
               if "CONSOLE" in line]  # fmt: skip
    assert console == []
    page = DeviceRows()
    page.feed(dom.stdout)
    assert page.body.get("data-phase") == "training"
    assert sorted(page.rows) == CLIENTS
    for device in during["devices"]:
        cells = page.rows[device["id"]]
        assert cells[:4] == [device["id"], device["profile"], device["trainer"],
                             str(device["samples"])]  # fmt: skip
        assert cells[4] == "online" and int(cells[7]) >= 2  # reported
    shown = page.points["chart-accuracy"]
    assert shown["labels"] == [r["round"] for r in rounds[: len(shown["labels"])]]
    assert shown["series"][0] == [r["accuracy"] for r in rounds[: len(shown["labels"])]]
    assert page.points["chart-sparsity"]["series"][0] == [
        r["sparsity"] for r in rounds[: len(page.points["chart-sparsity"]["labels"])]
    ]
    sent = page.points["chart-bytes"]["series"][0]
    assert sent == [r["bytes_up"] / 1024 for r in rounds[: len(sent)]] and len(sent) >= 2
    image = matplotlib.image.imread(ARTIFACTS / "dashboard.png")
    assert image.shape[:2] == (1300, 1400)

    # Prometheus, scraped while the run went, parsed by prometheus-client's parser
    assert scrape is not None
    samples = {s.name: s.value for f in text_string_to_metric_families(scrape.decode())
               for s in f.samples if not s.labels}  # fmt: skip
    assert samples["fedprune_devices_online"] == 3
    assert samples["fedprune_round"] >= 3
    assert samples["fedprune_updates_accepted_total"] >= 3 * (samples["fedprune_round"] - 1)
    assert samples["fedprune_round_duration_seconds_count"] >= 2
    assert samples["fedprune_uplink_bytes_total"] >= sum(r["bytes_up"] for r in rounds[:2])

    # After the run: the ledger in the run directory, and the report the demo pointed at
    devices = json.loads((run_dir / "devices.json").read_text())["devices"]
    assert [(d["id"], d["selected"], d["reported"], d["late"], d["rejected"]) for d in devices] == [
        (c, 8, 8, 0, 0) for c in CLIENTS
    ]
    for d in devices:
        export = json.loads((run_dir / "export" / d["profile"] / "export.json").read_text())
        assert d["model"] == export["sha256"]
        assert d["model_accuracy"] == pytest.approx(export["tflite_accuracy"])
        assert 10 < d["peak_memory_mb"] < 2000 and d["train_seconds"] > 0
    index = run_dir / "report" / "index.html"
    assert f"report     {index}" in out
    html = index.read_text()
    assert f"{rounds[-1]['accuracy']:.4f}" in html
    for name in ("accuracy.png", "sparsity.png", "bytes.png", "participation.png"):
        assert matplotlib.image.imread(run_dir / "report" / name).shape[0] > 200
