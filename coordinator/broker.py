"""A private MQTT broker on a free loopback port: mosquitto when installed, else amqtt in-process.

Used by the demo (zero setup on one machine) and by the tests (which insist on mosquitto).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from fedprune.protocol.errors import BrokerError

log = logging.getLogger("fedprune.broker")


UPDATE_ALLOWANCE = 1024 * 1024
"""Bytes of queued update a broker keeps per device for a client that is away or behind: a
round's update of the models fedprune trains is smaller (a pruned CNN's is 107 kB)."""

SESSION_EXPIRATION = "1h"
"""How long mosquitto keeps the session of a persistent client that went away (the coordinator's
and the aggregators' are persistent): a stall is survived, a dead process is forgotten."""


MOSQUITTO_MAX_QUEUED_BYTES = 2**31 - 1
"""The largest ``max_queued_bytes`` mosquitto 2.0.11 holds: it keeps the value in 32 bits
(measured: 2**32 + 100,000 acts as 100,000 and drops a 1 MB backlog)."""


def queue_settings(devices: int) -> list[str]:
    """mosquitto.conf lines that let a round's backlog wait for the coordinator while it is
    behind or away (docs/scaling.md): room for every device's update messages and, where
    mosquitto can say it, bytes (a fleet whose backlog may be larger gets no byte limit: a
    smaller one would drop what the round needs), and persistent sessions kept for an hour.
    Beyond that room mosquitto drops messages for that client (with a notice in its log), and
    devices resend what is not answered."""
    devices = max(devices, 1000)
    backlog = devices * UPDATE_ALLOWANCE
    room = [f"max_queued_bytes {backlog}"] if backlog <= MOSQUITTO_MAX_QUEUED_BYTES else []
    return [
        f"max_queued_messages {max(100_000, 10 * devices)}",
        *room,
        f"persistent_client_expiration {SESSION_EXPIRATION}",
    ]


def mosquitto_binary() -> str | None:
    """Debian installs mosquitto in /usr/sbin, which is not on a normal user's PATH."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout: float, alive: Any = lambda: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


class EmbeddedBroker:
    """``with EmbeddedBroker() as broker: ... broker.url``; ``kind`` is auto, mosquitto or amqtt."""

    def __init__(
        self, kind: str = "auto", *, message_size_limit: int = 0, port: int | None = None
    ) -> None:
        if kind == "auto":
            kind = "mosquitto" if mosquitto_binary() else "amqtt"
        if kind not in ("mosquitto", "amqtt"):
            raise BrokerError(f"unknown embedded broker {kind!r} (mosquitto or amqtt)")
        if kind == "mosquitto" and not mosquitto_binary():
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.kind = kind
        self.message_size_limit = message_size_limit
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._amqtt: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        if self.kind == "mosquitto":
            self._start_mosquitto()
        else:
            self._start_amqtt()
        process = self._process
        if not _wait_listening(self.port, 10, lambda: process is None or process.poll() is None):
            self.stop()
            raise BrokerError(f"the embedded {self.kind} broker did not start on port {self.port}")
        return self

    def _start_mosquitto(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fedprune-mosquitto-")
        conf = Path(self._tmp.name) / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            *queue_settings(10_000),
        ]
        if self.message_size_limit:
            lines.append(f"message_size_limit {self.message_size_limit}")
        conf.write_text("\n".join(lines) + "\n")
        self._process = subprocess.Popen(
            [mosquitto_binary() or "mosquitto", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _start_amqtt(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            self._amqtt = Broker(config, loop=loop)
            loop.run_until_complete(self._amqtt.start())
            started.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
        self._thread.start()
        started.wait(10)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
        if self._loop is not None and self._amqtt is not None:
            future = asyncio.run_coroutine_threadsafe(self._amqtt.shutdown(), self._loop)
            try:
                future.result(5)
            except Exception as exc:  # best effort at exit; the thread is a daemon
                log.debug("amqtt shutdown: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
