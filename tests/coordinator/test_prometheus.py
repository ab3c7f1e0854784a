"""Prometheus metrics from the round loop's hooks, scraped over HTTP and parsed."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedprune.coordinator.prometheus import Metrics
from fedprune.coordinator.result import RoundResult
from fedprune.protocol.codec import Update
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import Hello
from fedprune.protocol.transport import ConnectionChange, ConnectionEvent


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _hello(client_id: str) -> Hello:
    return Hello(client_id=client_id, profile="generic-x86-64", num_samples=1, backend="keras")


def test_a_scrape_shows_counters_gauges_and_histograms_of_the_run() -> None:
    metrics = Metrics("demo", rounds=20)
    port = metrics.serve(("127.0.0.1", 0))
    try:
        metrics.hello(_hello("a"))
        metrics.hello(_hello("b"))
        metrics.left("b")
        metrics.round_started(3, ["a", "b"], deadline=0.0, bytes_down=1000)
        metrics.received("a", 600)
        metrics.received("a", 400)
        metrics.accepted(
            "a",
            Update(
                round=3,
                num_samples=5,
                deltas=[np.zeros(1, np.float32)],
                metrics={"train_seconds": 0.7},
            ),
        )
        metrics.rejected("b", "norm", "too large")
        metrics.round_ended(
            RoundResult(
                round=3,
                accuracy=0.93,
                loss=0.2,
                client_accuracy=None,
                client_loss=None,
                sparsity=0.4,
                bytes_up=1000,
                bytes_down=2000,
                dense_bytes_up=1,
                dense_bytes_down=1,
                selected=2,
                reported=1,
                rejected={"norm": 1},
                seconds=4.2,
            ),
            late=[],
        )

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        metrics.close()

    got = _samples(text)
    assert got[("fedprune_updates_accepted_total", ())] == 1
    assert got[("fedprune_updates_rejected_total", (("reason", "norm"),))] == 1
    assert got[("fedprune_uplink_bytes_total", ())] == 1000
    assert got[("fedprune_downlink_bytes_total", ())] == 2000
    assert got[("fedprune_round", ())] == 3 and got[("fedprune_rounds", ())] == 20
    assert got[("fedprune_devices_online", ())] == 1
    assert got[("fedprune_accuracy", ())] == pytest.approx(0.93)
    assert got[("fedprune_sparsity", ())] == pytest.approx(0.4)
    assert got[("fedprune_round_duration_seconds_sum", ())] == pytest.approx(4.2)
    assert got[("fedprune_update_bytes_sum", ())] == 1000
    assert got[("fedprune_update_bytes_bucket", (("le", "1024.0"),))] == 1
    assert got[("fedprune_device_train_seconds_count", ())] == 1
    assert got[("fedprune_run_info", (("run", "demo"),))] == 1


def test_a_taken_port_is_a_one_line_config_error() -> None:
    first = Metrics("a", rounds=1)
    port = first.serve(("127.0.0.1", 0))
    try:
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Metrics("b", rounds=1).serve(("127.0.0.1", port))
    finally:
        first.close()


def test_connection_changes_and_overdue_updates_are_counted() -> None:
    # Prepare
    metrics = Metrics("demo", rounds=5)
    lost = ConnectionEvent(change=ConnectionChange.LOST, detail="lost the connection", waiting=3)
    kept = ConnectionEvent(change=ConnectionChange.RESTORED, detail="back", session_kept=True)
    gone = ConnectionEvent(change=ConnectionChange.RESTORED, detail="back", session_kept=False)

    # Execute
    for event in (lost, kept, lost, gone):
        metrics.connection(event)
    metrics.overdue("a", 1)
    got = _samples(generate_latest(metrics.registry).decode())

    # Assert
    changes = "fedprune_broker_connection_changes_total"
    assert got[(changes, (("change", "lost"),))] == 2
    assert got[(changes, (("change", "restored"),))] == 1
    assert got[(changes, (("change", "session_lost"),))] == 1
    assert got[("fedprune_updates_overdue_total", ())] == 1
