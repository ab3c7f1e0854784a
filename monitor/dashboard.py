"""The web dashboard: one page, its assets and a live stream of telemetry snapshots.

A small threaded HTTP server from the standard library serves ``/`` (the page), ``/static/...``
(its script, style and Chart.js, all shipped in the package: no CDN, labs are often offline),
``/snapshot.json`` (the latest snapshot) and ``/events`` (server-sent events: the latest snapshot
at once, then each new one). ``fedprune-monitor --web`` feeds it from the broker, the
coordinator's ``--dashboard`` from its own telemetry. It only reads: nothing on the page changes
the run. Chart.js ships gzipped (70 KB instead of 210 KB: the light install's size is budgeted)
and is sent as it is to browsers that take gzip, which all do.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, ClassVar

from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import Snapshot
from fedprune.protocol.telemetry import as_json

log = logging.getLogger("fedprune.dashboard")

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "chart.umd.min.js": "text/javascript; charset=utf-8",
}
KEEPALIVE_SECONDS = 15.0


def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``:PORT`` (both on loopback only) or ``HOST:PORT``; a one-line error otherwise."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"web address {text!r}: use PORT, :PORT or HOST:PORT (e.g. :8080)")
    return host.strip("[]") or "127.0.0.1", int(port)


class Dashboard:
    """Serves the dashboard on ``address`` (``(host, port)``; port 0 picks a free one)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self._latest: bytes | None = None
        self._version = 0
        self._changed = threading.Condition()
        self._closing = False
        try:
            self._server = ThreadingHTTPServer(address, _handler(self))
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the dashboard on {address[0]}:{address[1]}: {exc.strerror or exc}"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="fedprune-dashboard"
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host = str(host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> Dashboard:
        self._thread.start()
        log.info("dashboard at %s", self.url)
        return self

    def show(self, snapshot: Snapshot, coordinator: str = "online") -> None:
        """Make ``snapshot`` the one served and push it to every open page, with what is known
        of its coordinator (the monitor's ``Watcher.coordinator``; the coordinator's own
        dashboard: online)."""
        data = json.dumps(
            {"coordinator": coordinator, **as_json(snapshot)}, separators=(",", ":")
        ).encode()
        with self._changed:
            self._latest = data
            self._version += 1
            self._changed.notify_all()

    def latest(self) -> bytes | None:
        return self._latest

    def wait(self, seen: int, timeout: float) -> tuple[int, bytes | None]:
        """The newest snapshot after version ``seen`` (or the same one after ``timeout``)."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != seen or self._closing, timeout)
            return self._version, self._latest

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    """Serves one dashboard (set on a subclass per dashboard: :func:`_handler`)."""

    dashboard: ClassVar[Dashboard]
    web: ClassVar[Traversable]

    server_version = "fedprune-dashboard"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 - the base's name
        path = self.path.split("?", 1)[0]
        if path == "/events":
            self._events()
        elif path == "/snapshot.json":
            latest = self.dashboard.latest()
            if latest is None:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"no telemetry yet\n", "text/plain")
            else:
                self._send(HTTPStatus.OK, latest, "application/json")
        elif path in ("/", "/index.html"):
            self._page()
        elif path.startswith("/static/") and path[len("/static/") :] in ASSETS:
            self._asset(path[len("/static/") :])
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _page(self) -> None:
        """The page, with the latest snapshot inside so that it shows at once."""
        latest = self.dashboard.latest()
        # JSON inside a script element: no "<" at all, so no text can end or nest an element.
        inline = b"null" if latest is None else latest.replace(b"<", b"\\u003c")
        page = (
            (self.web / "index.html")
            .read_bytes()
            .replace(
                b'<script id="snapshot" type="application/json">null</script>',
                b'<script id="snapshot" type="application/json">' + inline + b"</script>",
            )
        )
        self._send(HTTPStatus.OK, page, ASSETS["index.html"])

    def _asset(self, name: str) -> None:
        packed = self.web / f"{name}.gz"
        if not packed.is_file():
            self._send(HTTPStatus.OK, (self.web / name).read_bytes(), ASSETS[name])
        elif "gzip" in self.headers.get("Accept-Encoding", ""):
            self._send(HTTPStatus.OK, packed.read_bytes(), ASSETS[name], encoding="gzip")
        else:
            self._send(HTTPStatus.OK, gzip.decompress(packed.read_bytes()), ASSETS[name])

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, encoding: str | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if encoding is not None:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        seen = 0  # version 0: nothing shown yet
        try:
            while not self.dashboard.closing:
                version, data = self.dashboard.wait(seen, KEEPALIVE_SECONDS)
                if version != seen and data is not None:
                    self.wfile.write(b"data: " + data + b"\n\n")
                else:
                    self.wfile.write(b": keep-alive\n\n")
                seen = version
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page was closed


def _handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    """The request handler class of ``dashboard``."""
    web = resources.files("fedprune.monitor") / "web-assets"
    return type("Handler", (_Handler,), {"dashboard": dashboard, "web": web})
