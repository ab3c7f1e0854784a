"""Prometheus metrics of a run on ``/metrics`` (prometheus-client), fed by the round loop's hooks.

Names follow Prometheus conventions: a ``fedprune_`` prefix, base units (seconds, bytes),
``_total`` on counters. Each coordinator has its own registry, so several can share a process.
"""

from __future__ import annotations

from threading import Thread
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedprune.coordinator.observer import Observer
from fedprune.protocol.codec import Update
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import Hello
from fedprune.protocol.transport import ConnectionChange, ConnectionEvent

if TYPE_CHECKING:
    from fedprune.coordinator.result import RoundResult

BYTES_BUCKETS = tuple(float(4**k) for k in range(5, 14))  # 1 KiB .. 64 MiB
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics(Observer):
    def __init__(self, run: str, *, rounds: int) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.accepted_updates = Counter(
            "fedprune_updates_accepted", "Updates that passed validation.", registry=r
        )
        self.rejected_updates = Counter(
            "fedprune_updates_rejected",
            "Messages refused on devices' topics, by reason.",
            ["reason"],
            registry=r,
        )
        self.bytes_up = Counter(
            "fedprune_uplink_bytes",
            "Bytes received on devices' update topics, added when each round ends (metrics.jsonl's"
            " bytes_up).",
            registry=r,
        )
        self.bytes_down = Counter(
            "fedprune_downlink_bytes",
            "Bytes of model and round announcement sent, once per selected device, added when"
            " each round ends (metrics.jsonl's bytes_down).",
            registry=r,
        )
        self.round = Gauge("fedprune_round", "The round in progress, or the last one.", registry=r)
        self.rounds = Gauge("fedprune_rounds", "Rounds in the run.", registry=r)
        self.online = Gauge("fedprune_devices_online", "Devices online.", registry=r)
        self.accuracy = Gauge(
            "fedprune_accuracy", "Held-out accuracy after the last round (0..1).", registry=r
        )
        self.sparsity = Gauge(
            "fedprune_sparsity", "Share of pruned weights after the last round.", registry=r
        )
        self.round_seconds = Histogram(
            "fedprune_round_duration_seconds",
            "Wall time of a round.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.update_bytes = Histogram(
            "fedprune_update_bytes",
            "Size on the wire of accepted updates.",
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.train_seconds = Histogram(
            "fedprune_device_train_seconds",
            "Local training time devices report per update.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.connection_changes = Counter(
            "fedprune_broker_connection_changes",
            "The coordinator's connection to the broker lost, restored with the session kept, or"
            " restored with the session lost (what was published for it meanwhile is gone).",
            ["change"],
            registry=r,
        )
        self.overdue_updates = Counter(
            "fedprune_updates_overdue",
            "Updates that devices say they resent for want of a notice, not received by then.",
            registry=r,
        )
        self.info = Gauge(
            "fedprune_run_info", "The run this coordinator serves.", ["run"], registry=r
        )
        self.info.labels(run=run).set(1)
        self.rounds.set(rounds)
        self._online: set[str] = set()
        self._pending: dict[str, int] = {}  # bytes received per device this round
        self._server: tuple[WSGIServer, Thread] | None = None

    def serve(self, address: tuple[str, int]) -> int:
        """Expose ``/metrics`` on ``(host, port)`` (port 0: a free one); the port it listens on."""
        host, port = address
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self._server = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._server = None

    # -- hooks -----------------------------------------------------------------------------------

    def hello(self, hello: Hello) -> None:
        self._online.add(hello.client_id)
        self.online.set(len(self._online))

    def left(self, client_id: str) -> None:
        self._online.discard(client_id)
        self.online.set(len(self._online))

    def round_started(
        self, round_: int, selected: list[str], deadline: float, bytes_down: int
    ) -> None:
        self.round.set(round_)
        self._pending.clear()

    def received(self, client_id: str, nbytes: int) -> None:
        self._pending[client_id] = self._pending.get(client_id, 0) + nbytes

    def accepted(self, client_id: str, update: Update) -> None:
        self.accepted_updates.inc()
        self.update_bytes.observe(self._pending.pop(client_id, 0))
        seconds = update.metrics.get("train_seconds")
        if seconds is not None:
            self.train_seconds.observe(seconds)

    def rejected(self, client_id: str, reason: str, text: str) -> None:
        self.rejected_updates.labels(reason=reason).inc()

    def overdue(self, client_id: str, resends: int) -> None:
        self.overdue_updates.inc()

    def connection(self, event: ConnectionEvent) -> None:
        change = event.change.value
        if event.change is ConnectionChange.RESTORED:
            change = "restored" if event.session_kept else "session_lost"
        self.connection_changes.labels(change=change).inc()

    def round_ended(self, result: RoundResult, late: list[str]) -> None:
        self.bytes_up.inc(result.bytes_up)
        self.bytes_down.inc(result.bytes_down)
        self.round_seconds.observe(result.seconds)
        self.sparsity.set(result.sparsity)
        if result.accuracy is not None:
            self.accuracy.set(result.accuracy)
