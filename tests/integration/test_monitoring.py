"""Monitoring a real run: mosquitto, the coordinator and three device processes, watched through
every window an operator has while it runs (the monitor's JSON and its terminal view, the web
dashboard in a real headless chromium, the Prometheus endpoint), then the run report.

The dashboard's screenshot and the terminal view's SVG are kept in ``test-artifacts/``.
"""

from __future__ import annotations

import json
import shutil
import signal
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
from processes import coordinator as coordinator_command
from processes import start_device
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
        "--timeout=20000",
        *flags,
        url,
    ]


def _all_at_once(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands side by side (the run goes on meanwhile); each one's outcome."""
    started = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    done = []
    for command, process in zip(commands, started, strict=True):
        out, err = process.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return done


def test_a_running_fleet_is_visible_in_the_monitor_the_dashboard_and_prometheus(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: a coordinator serving the dashboard and metrics, three device processes
    from fedprune.coordinator import digits

    ARTIFACTS.mkdir(exist_ok=True)
    paths, heldout = digits.write_demo_data(tmp_path / "data", 3, alpha=0.5, seed=0)
    web, metrics_port = _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{web}/"
    argv = coordinator_command(
        mosquitto,
        run=RUN,
        min_clients=3,
        rounds=6,
        begin_round=1,
        end_round=4,
        heldout=heldout,
        out=tmp_path / "runs",
        round_timeout=120,
        dashboard=f"127.0.0.1:{web}",
        metrics_port=f"127.0.0.1:{metrics_port}",
    )
    coordinator = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    profiles = ["raspberry-pi-4", "raspberry-pi-zero-2w", "generic-x86-64"]
    devices = [
        start_device(
            mosquitto,
            RUN,
            name,
            data,
            "--profile",
            profile,
            "--models",
            str(tmp_path / name),
            "--cache",
            str(tmp_path / "cache"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=None,
        )
        for name, data, profile in zip(CLIENTS, paths, profiles, strict=True)
    ]
    try:
        # Execute: from round 3 on, client-2 is paused, so the coordinator waits for it in a round
        # where the other two have reported; every window looks at that moment.
        _snapshot_when(dashboard, lambda s: s["run"]["round"] >= 3, coordinator, timeout=300)
        devices[2].send_signal(signal.SIGSTOP)
        during = _snapshot_when(
            dashboard,
            lambda s: (
                s["progress"] is not None and sorted(s["progress"]["reported"]) == CLIENTS[:2]
            ),
            coordinator,
            timeout=300,
        )
        scrape = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        monitor_command = [
            sys.executable,
            "-m",
            "fedprune.monitor.cli",
            "--broker",
            mosquitto,
            "--run",
            RUN,
            "--once",
        ]
        monitor, view, dom, shot = _all_at_once(
            [
                [*monitor_command, "--json"],
                [*monitor_command, "--svg", str(ARTIFACTS / "monitor.svg")],
                _chromium(dashboard, "--dump-dom"),
                _chromium(dashboard, f"--screenshot={ARTIFACTS / 'dashboard.png'}"),
            ]
        )
        devices[2].send_signal(signal.SIGCONT)
        out, _ = coordinator.communicate(timeout=600)
        logs = [device.communicate(timeout=120)[0] for device in devices]
    finally:
        for process in (coordinator, *devices):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
    run_dir = tmp_path / "runs" / RUN
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report = subprocess.run(
        [sys.executable, "-m", "fedprune.coordinator.report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert: the run itself went through
    assert coordinator.returncode == 0, out[-3000:]
    assert [d.returncode for d in devices] == [0, 0, 0], "\n".join(g[-2000:] for g in logs)
    assert len(rounds) == 6 and all(r["reported"] == 3 for r in rounds)
    waiting = during["progress"]["round"]
    assert during["run"]["phase"] == "training" and waiting >= 3

    # The monitor: one JSON snapshot of the waiting round; its rounds are metrics.jsonl's
    assert monitor.returncode == 0, monitor.stderr
    snapshot = json.loads(monitor.stdout)
    assert snapshot["coordinator"] == "online" and snapshot["run"]["name"] == RUN
    assert (snapshot["run"]["phase"], snapshot["run"]["round"]) == ("training", waiting)
    assert sorted(snapshot["progress"]["reported"]) == CLIENTS[:2]
    assert sorted(snapshot["progress"]["selected"]) == CLIENTS
    assert [d["id"] for d in snapshot["devices"]] == CLIENTS
    assert [d["reported"] for d in snapshot["devices"]] == [waiting, waiting, waiting - 1]
    assert snapshot["rounds"] == rounds[: waiting - 1]
    assert view.returncode == 0, view.stderr
    svg = (ARTIFACTS / "monitor.svg").read_text()
    assert all(c in svg for c in CLIENTS) and RUN in svg

    # The dashboard in chromium: no console messages; the table and the charts show the run
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:]
    console = [
        line for line in dom.stderr.splitlines() + shot.stderr.splitlines() if "CONSOLE" in line
    ]
    assert console == []
    page = DeviceRows()
    page.feed(dom.stdout)
    assert (page.body.get("data-phase"), page.body.get("data-round")) == ("training", str(waiting))
    assert sorted(page.rows) == CLIENTS
    for device in snapshot["devices"]:
        cells = page.rows[device["id"]]
        assert cells[:4] == [
            device["id"],
            device["profile"],
            device["trainer"],
            str(device["samples"]),
        ]
        assert cells[4] == "online" and cells[6:8] == [str(waiting), str(device["reported"])]
    assert "waiting for: client-2" in dom.stdout
    shown = page.points["chart-accuracy"]
    assert shown["labels"] == list(range(1, waiting))
    assert shown["series"] == [
        [r["accuracy"] for r in rounds[: waiting - 1]],
        [r["client_accuracy"] for r in rounds[: waiting - 1]],
    ]
    assert page.points["chart-sparsity"]["series"] == [
        [r["sparsity"] for r in rounds[: waiting - 1]]
    ]
    assert page.points["chart-bytes"]["series"][0] == [
        r["bytes_up"] / 1024 for r in rounds[: waiting - 1]
    ]
    assert matplotlib.image.imread(ARTIFACTS / "dashboard.png").shape[:2] == (1300, 1400)

    # Prometheus, scraped in the waiting round, parsed by prometheus-client's parser
    assert scrape is not None
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(scrape.decode())
        for s in f.samples
        if not s.labels
    }
    assert samples["fedprune_round"] == waiting and samples["fedprune_rounds"] == 6
    assert samples["fedprune_devices_online"] == 3
    assert samples["fedprune_updates_accepted_total"] == 3 * (waiting - 1) + 2
    assert samples["fedprune_round_duration_seconds_count"] == waiting - 1
    assert samples["fedprune_uplink_bytes_total"] >= sum(
        r["bytes_up"] for r in rounds[: waiting - 1]
    )
    assert samples["fedprune_accuracy"] == pytest.approx(rounds[waiting - 2]["accuracy"])

    # After the run: the ledger in the run directory, and the report
    devices_json = json.loads((run_dir / "devices.json").read_text())["devices"]
    assert [
        (d["id"], d["selected"], d["reported"], d["late"], d["rejected"]) for d in devices_json
    ] == [(c, 6, 6, 0, 0) for c in CLIENTS]
    for d in devices_json:
        export = json.loads((run_dir / "export" / d["profile"] / "export.json").read_text())
        assert d["model"] == export["sha256"]
        assert d["model_accuracy"] == pytest.approx(export["tflite_accuracy"])
        assert 10 < d["peak_memory_mb"] < 2000 and d["train_seconds"] > 0
    assert "devices.json" in out  # the coordinator's summary
    assert report.returncode == 0, report.stderr
    html = (run_dir / "report" / "index.html").read_text()
    assert f"{rounds[-1]['accuracy']:.4f}" in html
    for name in ("accuracy.png", "sparsity.png", "bytes.png", "participation.png"):
        assert matplotlib.image.imread(run_dir / "report" / name).shape[0] > 200


def test_the_dashboard_shows_updates_that_devices_say_they_sent_and_have_not_arrived() -> None:
    # Prepare: a round in which pi-2 resent its update for want of a notice, nothing from it here
    from fedprune.monitor.dashboard import Dashboard
    from fedprune.protocol.messages import Snapshot
    from fedprune.protocol.telemetry import Progress, RunInfo

    run = RunInfo(
        name=RUN,
        session="s1",
        phase="training",
        round=2,
        rounds=5,
        deadline=1060.0,
        model_version=2,
        sparsity_target=0.8,
        sparsity=0.4,
        started=1000.0,
        updated=1030.0,
    )
    progress = Progress(
        round=2,
        started=1020.0,
        deadline=1060.0,
        selected=["pi-1", "pi-2"],
        reported=["pi-1"],
        rejected={},
        bytes_up=2048,
        overdue=["pi-2"],
    )
    dashboard = Dashboard(("127.0.0.1", 0)).start()
    dashboard.show(Snapshot(run=run, progress=progress, rounds=[], devices=[], events=[]))

    # Execute
    try:
        done = subprocess.run(
            _chromium(dashboard.url, "--dump-dom"), capture_output=True, text=True, timeout=120
        )
    finally:
        dashboard.close()

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        '<div class="overdue">overdue: 1 update(s) that devices say they sent have not arrived'
        " (they resend them): pi-2</div>"
    ) in done.stdout
