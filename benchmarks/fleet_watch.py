"""What benchmarks/fleet.py measures a run with, from outside its processes: /proc readings, a
separate subscriber that times the rounds, a private mosquitto with a notice-level log, busy
processes beside the run, a SIGSTOP of the coordinator, and what the broker's log says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from simulated_fleet import RUN

from fedprune.coordinator.broker import free_port, mosquitto_binary, queue_settings
from fedprune.protocol.envelope import decode
from fedprune.protocol.messages import Round, RoundMetrics
from fedprune.protocol.signing import Trust
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport


def proc_kib(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS, VmHWM); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watcher:
    """A separate subscriber: when each round is announced and when its metrics line comes, with
    the coordinator's CPU time and peak memory read at those moments."""

    def __init__(self, url: str, trust: Trust, coordinator: int) -> None:
        self.trust, self.coordinator = trust, coordinator
        self.announced: dict[int, tuple[float, float, int]] = {}  # round -> (time, cpu, hwm)
        self.ended: dict[int, tuple[float, float, int, dict[str, Any]]] = {}
        self.changed = threading.Condition()
        topics = Topics(RUN)
        self.transport = MqttTransport(url, client_id="fleet-watcher")
        self.transport.subscribe(topics.round)
        self.transport.subscribe(topics.metrics)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            item = self.transport.get(timeout=1.0)
            if item is None or not item[1]:
                continue
            now, pid = time.perf_counter(), self.coordinator
            cpu, hwm = cpu_seconds(pid), proc_kib(pid, "VmHWM")
            message = decode(item[1], self.trust).message
            with self.changed:
                if isinstance(message, Round):
                    self.announced.setdefault(message.round, (now, cpu, hwm))
                elif isinstance(message, RoundMetrics):
                    values = message.values
                    self.ended.setdefault(int(values["round"]), (now, cpu, hwm, values))
                self.changed.notify_all()

    def wait_announced(self, round_: int, then: float) -> bool:
        """Wait until ``round_`` is announced, then ``then`` seconds more; ``False`` if the
        run ended first."""
        with self.changed:
            while round_ not in self.announced:
                if self.ended and max(self.ended) >= round_:
                    return False
                self.changed.wait(0.5)
        time.sleep(then)
        return True

    def wait_for(self, round_: int, alive: Any, timeout: float) -> None:
        end = time.monotonic() + timeout
        with self.changed:
            while round_ not in self.ended:
                if not alive() or time.monotonic() > end:
                    raise RuntimeError(f"round {round_} did not end (coordinator alive: {alive()})")
                self.changed.wait(0.5)


class Mosquitto:
    """A private mosquitto configured as ``fedprune-provision`` configures one for ``devices``
    (coordinator.broker.queue_settings: room for a round's backlog, sessions kept an hour), with
    a notice-level log."""

    def __init__(self, folder: Path, devices: int) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
        self.port = free_port()
        conf = folder / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stdout\nlog_type error\nlog_type warning\nlog_type notice\n"
            "max_inflight_messages 100\n" + "\n".join(queue_settings(devices)) + "\n"
        )
        self.log = (folder / "mosquitto.log").open("wb")
        self.process = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT
        )
        time.sleep(0.3)
        if self.process.poll() is not None:
            raise SystemExit(f"mosquitto did not start: {(folder / 'mosquitto.log').read_text()}")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


class Hogs:
    """``count`` processes that each keep a core busy (a second job on the machine) while the
    run lasts."""

    def __init__(self, count: int) -> None:
        self.processes = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)
        ]

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def pause(pid: int, seconds: float) -> None:
    """Hold process ``pid`` still (SIGSTOP) for ``seconds``, as a long stall would."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def broker_evidence(log_file: Path, client_id: str) -> dict[str, int]:
    """What mosquitto's notice-level log says happened to ``client_id``: the times it dropped
    its connection (a keepalive timeout or another loss), and messages it dropped for it."""
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    lines = [line for line in text.splitlines() if client_id in line]
    return {
        "timeouts": sum("exceeded timeout" in line for line in lines),
        "disconnects": sum("disconnect" in line.lower() for line in lines),
        "dropped_notices": sum("dropped" in line.lower() for line in lines),
    }
