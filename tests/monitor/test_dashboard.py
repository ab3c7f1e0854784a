"""The dashboard's HTTP server: page, assets, the latest snapshot and the event stream."""

from __future__ import annotations

import dataclasses
import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from fedprune.monitor.dashboard import ASSETS, Dashboard, parse_address
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import Snapshot
from fedprune.protocol.telemetry import Event, RunInfo

SNAPSHOT = Snapshot(
    run=RunInfo(
        name="demo",
        session="s1",
        phase="training",
        round=2,
        rounds=5,
        deadline=None,
        model_version=2,
        sparsity_target=0.8,
        sparsity=0.2,
        started=1.0,
        updated=2.0,
    ),
    progress=None,
    rounds=[{"round": 1, "loss": float("nan")}],
    devices=[],
    events=[],
)


@pytest.fixture
def dashboard() -> Iterator[Dashboard]:
    served = Dashboard(("127.0.0.1", 0)).start()
    yield served
    served.close()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_chartjs_goes_gzipped_to_browsers_that_take_it_and_plain_to_others(
    dashboard: Dashboard,
) -> None:
    url = f"{dashboard.url}static/chart.umd.min.js"
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip, deflate"})
    with urllib.request.urlopen(request, timeout=5) as response:
        packed, encoding = response.read(), response.headers["Content-Encoding"]

    plain = _get(url)[2]

    assert encoding == "gzip" and len(packed) < len(plain) / 2
    assert gzip.decompress(packed) == plain and plain.startswith(b"/*!\n * Chart.js v4")


def test_the_page_and_every_asset_it_needs_are_served_from_the_package(
    dashboard: Dashboard,
) -> None:
    status, kind, page = _get(dashboard.url)

    assert (status, kind) == (200, "text/html; charset=utf-8")
    for name in ("app.js", "style.css", "chart.umd.min.js"):
        assert f"/static/{name}".encode() in page
        status, kind, body = _get(f"{dashboard.url}static/{name}")
        assert (status, kind) == (200, ASSETS[name]) and len(body) > 500
    assert b"http" not in page.replace(b"http-equiv", b"")  # nothing from another host


def test_the_latest_snapshot_is_json_with_nan_as_null(dashboard: Dashboard) -> None:
    assert _get(f"{dashboard.url}snapshot.json")[0] == 503

    dashboard.show(SNAPSHOT)
    status, kind, body = _get(f"{dashboard.url}snapshot.json")

    assert (status, kind) == (200, "application/json")
    data = json.loads(body)
    assert data["run"]["name"] == "demo" and data["rounds"] == [{"round": 1, "loss": None}]


def test_the_event_stream_sends_the_latest_snapshot_then_each_new_one(
    dashboard: Dashboard,
) -> None:
    dashboard.show(SNAPSHOT)
    with urllib.request.urlopen(f"{dashboard.url}events", timeout=5) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        first = stream.readline()
        assert stream.readline() == b"\n"
        dashboard.show(
            Snapshot(
                **{**SNAPSHOT.__dict__, "run": RunInfo(**{**SNAPSHOT.run.__dict__, "round": 3})}
            )
        )
        second = stream.readline()

    assert json.loads(first.removeprefix(b"data: "))["run"]["round"] == 2
    assert json.loads(second.removeprefix(b"data: "))["run"]["round"] == 3


@pytest.mark.parametrize("path", ["/static/../../etc/passwd", "/static/secret.py", "/nothing"])
def test_anything_else_is_not_found(dashboard: Dashboard, path: str) -> None:
    assert _get(dashboard.url.rstrip("/") + path)[0] == 404


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("8080", ("127.0.0.1", 8080)),
        (":8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:9000", ("0.0.0.0", 9000)),
        ("[::1]:80", ("::1", 80)),
    ],
)
def test_web_addresses_default_to_loopback(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["", "host", "host:http", ":99999"])
def test_a_bad_web_address_is_a_one_line_error(text: str) -> None:
    with pytest.raises(ConfigError, match="use PORT, :PORT or HOST:PORT"):
        parse_address(text)


def test_a_taken_port_is_a_one_line_error(dashboard: Dashboard) -> None:
    port = int(dashboard.url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(ConfigError, match=f"cannot serve the dashboard on 127.0.0.1:{port}"):
        Dashboard(("127.0.0.1", port))


def test_the_page_carries_the_latest_snapshot_and_no_markup_can_break_out_of_it(
    dashboard: Dashboard,
) -> None:
    hostile = "</script><script>alert(1)</script>"
    event = Event(time=1.0, kind="reject", text=hostile, device="pi-1")
    dashboard.show(dataclasses.replace(SNAPSHOT, events=[event]))

    page = _get(dashboard.url)[2].decode()

    start = page.index('<script id="snapshot" type="application/json">') + len(
        '<script id="snapshot" type="application/json">'
    )
    inline = page[start : page.index("</script>", start)]
    assert json.loads(inline)["events"][0]["text"] == hostile
    assert page.count("<script>alert(1)") == 0


def test_an_open_stream_without_a_snapshot_waits_quietly(dashboard: Dashboard) -> None:
    # Before any snapshot the stream sends nothing but a keep-alive every 15 s (no busy loop)
    with urllib.request.urlopen(f"{dashboard.url}events", timeout=5) as stream:
        stream.fp.raw._sock.settimeout(1.0)  # type: ignore[union-attr]
        with pytest.raises(TimeoutError):
            stream.read(1)
