"""A provisioned fleet on a real mosquitto: TLS with client certificates, one password per
device, and the ACL fedprune-provision writes (issue 9, the broker's layer)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from stolen_device import StolenDevice

from fedprune.coordinator import digits, provision
from fedprune.coordinator.aggregation import l2_norm
from fedprune.coordinator.broker import free_port, mosquitto_binary
from fedprune.protocol.codec import Model
from fedprune.protocol.connection import BrokerSettings
from fedprune.protocol.errors import BrokerError
from fedprune.protocol.signing import load_signing_key
from fedprune.protocol.transport import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Fleet:
    folder: Path
    url: str
    broker: subprocess.Popen[bytes]
    etc: Path  # where mosquitto reads the broker folder's files

    def settings(self, who: str, stem: str, **changes: str | None) -> BrokerSettings:
        home = self.folder / who
        files: dict[str, str | None] = {
            "ca": str(home / "ca.crt"),
            "cert": str(home / f"{stem}.crt"),
            "key": str(home / f"{stem}.key"),
        }
        files.update(changes)
        return BrokerSettings.load(self.url, environ={}, **files)  # type: ignore[arg-type]

    def flags(self, who: str, stem: str) -> list[str]:
        home = self.folder / who
        return [
            "--broker",
            self.url,
            "--ca",
            str(home / "ca.crt"),
            "--cert",
            str(home / f"{stem}.crt"),
            "--key",
            str(home / f"{stem}.key"),
        ]


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """``fedprune-provision init`` with two devices (or the test's parameter), its broker folder
    copied where mosquitto
    (which drops to the 'mosquitto' user before reading keys) can read it, as an operator copies
    it to /etc/mosquitto, and mosquitto started with it."""
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run scripts/setup.sh (apt-get install mosquitto)")
    folder, port = tmp_path / "fleet", free_port()
    etc = Path(tempfile.mkdtemp(prefix="fedprune-etc-"))
    etc.chmod(0o755)
    done = subprocess.run(
        [
            BIN / "fedprune-provision",
            "init",
            folder,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--devices",
            str(getattr(request, "param", 2)),
            "--prefix",
            "pi",
            "--broker-dir",
            etc / "broker",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    shutil.copytree(folder / "broker", etc / "broker")
    shutil.chown(etc / "broker" / "server.key", group="mosquitto")  # copies keep mode, not group
    broker = subprocess.Popen(
        [mosquitto_binary() or "mosquitto", "-c", str(etc / "broker" / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    assert broker.poll() is None, "mosquitto did not start with the provisioned configuration"
    yield Fleet(folder=folder, url=f"mqtts://127.0.0.1:{port}", broker=broker, etc=etc / "broker")
    broker.terminate()
    broker.wait(10)
    shutil.rmtree(etc, ignore_errors=True)


def _unpack(bundle: Path, into: Path) -> Path:
    """The bundle as a device gets it: copied and unpacked somewhere else."""
    with tarfile.open(bundle) as tar:
        tar.extractall(into, filter="data")
    return into / bundle.name.removesuffix(".tar.gz") / "device.toml"


def test_a_provisioned_fleet_trains_over_tls_with_one_account_per_device_and_robust_rule(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Prepare: each device has only its bundle; the coordinator its own account
    paths, heldout = digits.write_demo_data(tmp_path / "data", 2, alpha=100.0, seed=0)
    configs = [
        _unpack(fleet.folder / "devices" / f"pi-{i}.tar.gz", tmp_path / f"device-{i}")
        for i in (1, 2)
    ]
    coordinator = subprocess.Popen(
        [
            BIN / "fedprune-coordinator",
            *fleet.flags("coordinator", "coordinator"),
            "--run",
            "secure",
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
            "--aggregation",
            "median",
            "--clip-norm",
            "50",
            "--signing-key",
            fleet.folder / "coordinator/signing.key",
            "--device-keys",
            fleet.folder / "coordinator/device-keys",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Execute
    devices = [
        subprocess.Popen(
            [
                BIN / "fedprune-client",
                "--config",
                config,
                "--run",
                "secure",
                "--data",
                data,
                "--profile",
                "raspberry-pi-4",
                "--models",
                tmp_path / f"models-{i}",
                "--cache",
                tmp_path / "cache",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, (config, data) in enumerate(zip(configs, paths, strict=True))
    ]
    logs = [device.communicate(timeout=300)[0] for device in devices]
    _, err = coordinator.communicate(timeout=300)
    # The monitor with its provisioned read-only account, over TLS, checking signatures
    monitor = subprocess.run(
        [
            BIN / "fedprune-monitor",
            "--config",
            fleet.folder / "monitor" / "monitor.toml",
            "--run",
            "secure",
            "--once",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert
    assert coordinator.returncode == 0, err[-3000:]
    assert monitor.returncode == 0, monitor.stderr
    snapshot = json.loads(monitor.stdout)
    assert snapshot["run"]["signed"] and snapshot["run"]["phase"] == "finished"
    assert [(d["id"], d["reported"]) for d in snapshot["devices"]] == [("pi-1", 3), ("pi-2", 3)]
    assert [d.returncode for d in devices] == [0, 0], "\n".join(log[-2000:] for log in logs)
    rounds = [json.loads(line) for line in (tmp_path / "runs/secure/metrics.jsonl").open()]
    assert [r["reported"] for r in rounds] == [2, 2, 2]
    assert rounds[-1]["accuracy"] >= 0.5  # learned under TLS with clipping and a trimmed mean
    assert all("mqtts://127.0.0.1" in log for log in logs)


def test_the_broker_drops_what_a_device_publishes_outside_its_own_topics(fleet: Fleet) -> None:
    # Prepare: the coordinator's account sees everything under fedprune/
    coordinator = MqttTransport(fleet.settings("coordinator", "coordinator"), client_id="x")
    coordinator.subscribe("fedprune/#")
    device = MqttTransport(fleet.settings("devices/pi-1", "device"), client_id="pi-1")
    device.subscribe("fedprune/v1/r/clients/+/status")

    # Execute: its own status, another device's status and update, the coordinator's status
    for topic, payload in [
        ("fedprune/v1/r/clients/pi-1/status", b"own"),
        ("fedprune/v1/r/clients/pi-2/status", b"forged offline"),
        ("fedprune/v1/r/clients/pi-2/update/1/0", b"forged update"),
        ("fedprune/v1/r/coordinator/status", b"forged finished"),
        ("fedprune/v1/r/spec", b"forged spec"),
    ]:
        device.publish(topic, payload)
    device.flush(timeout=5)
    coordinator.publish("fedprune/v1/r/clients/pi-2/status", b"pi-2 hello")
    coordinator.flush(timeout=5)
    seen = _drain(coordinator)
    by_device = _drain(device)
    coordinator.close()
    device.close()

    # Assert: only its own topic got through; it cannot read other devices' statuses either
    assert seen == [
        ("fedprune/v1/r/clients/pi-1/status", b"own"),
        ("fedprune/v1/r/clients/pi-2/status", b"pi-2 hello"),
    ]
    assert by_device == []


def test_the_monitor_reads_what_it_shows_and_nothing_is_larger_than_a_runs_chunks(
    fleet: Fleet,
) -> None:
    # Prepare: the monitor's read-only account subscribed to everything; the coordinator's
    # account sees every message that got in
    monitor = MqttTransport(fleet.settings("monitor", "monitor"), client_id="monitor")
    monitor.subscribe("fedprune/#")
    coordinator = MqttTransport(
        fleet.settings("coordinator", "coordinator"), client_id="x", max_payload=3 * 2**20
    )
    coordinator.subscribe("fedprune/v1/r/clients/#")
    device = MqttTransport(
        fleet.settings("devices/pi-1", "device"), client_id="pi-1", max_payload=3 * 2**20
    )

    # Execute: the coordinator publishes what the monitor shows and what it must not see; the
    # device sends an update chunk, one nested deeper, and one over the broker's packet limit
    for topic in ("telemetry", "coordinator/status", "metrics", "clients/pi-1/inbox"):
        coordinator.publish(f"fedprune/v1/r/{topic}", b"x")
    coordinator.flush(timeout=5)
    device.publish("fedprune/v1/r/clients/pi-1/update/1/0", b"chunk")
    device.publish("fedprune/v1/r/clients/pi-1/update/1/0/deeper", b"deeper")
    device.flush(timeout=5)
    seen_by_monitor = _drain(monitor)
    device.publish("fedprune/v1/r/clients/pi-1/update/1/1", b"\0" * (2 * 2**20 + 128 * 1024))
    device.flush(timeout=5)
    seen = _drain(coordinator)
    for transport in (monitor, coordinator, device):
        transport.close()

    # Assert: the monitor got its three topics and no device's update or inbox; of the
    # device's, only the ordinary chunk got in
    assert sorted(t for t, _ in seen_by_monitor) == [
        "fedprune/v1/r/coordinator/status",
        "fedprune/v1/r/metrics",
        "fedprune/v1/r/telemetry",
    ]
    assert [t for t, _ in seen] == [
        "fedprune/v1/r/clients/pi-1/inbox",
        "fedprune/v1/r/clients/pi-1/update/1/0",
    ]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"cert": None, "key": None}, "requires a client certificate does this when none is"),
        ({"ca": None}, "failed: self-signed certificate in certificate chain (check --ca"),
    ],
    ids=["no-certificate", "unknown-ca"],
)
def test_a_device_without_its_certificate_is_refused_and_told_why(
    fleet: Fleet, changes: dict[str, str | None], reason: str
) -> None:
    # Execute
    with pytest.raises(BrokerError) as caught:
        MqttTransport(
            fleet.settings("devices/pi-1", "device", **changes),
            client_id="pi-1",
            connect_attempts=1,
        )

    # Assert
    assert reason in str(caught.value)


def test_a_certificate_is_its_account_whatever_name_and_password_it_claims(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Prepare: pi-1's certificate, with pi-2's name as user name and client id
    claims = tmp_path / "claims.toml"
    claims.write_text('username = "pi-2"\npassword = "anything"\n')
    coordinator = MqttTransport(fleet.settings("coordinator", "coordinator"), client_id="x")
    coordinator.subscribe("fedprune/v1/r/clients/+/status")
    device = MqttTransport(
        fleet.settings("devices/pi-1", "device", credentials=str(claims)), client_id="pi-2"
    )

    # Execute
    device.publish("fedprune/v1/r/clients/pi-2/status", b"as pi-2")
    device.publish("fedprune/v1/r/clients/pi-1/status", b"as pi-1")
    device.flush(timeout=5)
    seen = _drain(coordinator)
    coordinator.close()
    device.close()

    # Assert: the broker took it for pi-1, the name in its certificate
    assert seen == [("fedprune/v1/r/clients/pi-1/status", b"as pi-1")]


def test_a_revoked_device_is_refused_after_the_broker_reloads(fleet: Fleet) -> None:
    # Execute: revoke pi-2, then SIGHUP makes mosquitto reread its revocation list and ACL
    done = subprocess.run(
        [BIN / "fedprune-provision", "revoke", fleet.folder, "pi-2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for name in ("crl.pem", "acl"):  # the operator copies the changed files again
        shutil.copy(fleet.folder / "broker" / name, fleet.etc / name)
    fleet.broker.send_signal(signal.SIGHUP)
    time.sleep(0.5)

    # Assert: pi-2's certificate is refused, pi-1's is not
    assert done.returncode == 0, done.stderr
    with pytest.raises(BrokerError, match="certificate"):
        MqttTransport(fleet.settings("devices/pi-2", "device"), client_id="pi-2")
    MqttTransport(fleet.settings("devices/pi-1", "device"), client_id="pi-1").close()
    assert provision.Fleet.read(fleet.folder).devices == {"pi-1": "active", "pi-2": "revoked"}


def _litert_devices(
    fleet: Fleet, tmp_path: Path, run: str, paths: list[Path]
) -> list[subprocess.Popen[bytes]]:
    """pi-1, pi-2, ... from their unpacked bundles, each with its data of ``paths``."""
    return [
        subprocess.Popen(
            [
                BIN / "fedprune-client",
                *(
                    "--config",
                    _unpack(fleet.folder / "devices" / f"pi-{i}.tar.gz", tmp_path / f"d{i}"),
                ),
                *("--run", run, "--data", path, "--profile", "raspberry-pi-4"),
                *("--trainer", "litert", "--cache", tmp_path / f"cache-{i}", "--no-deploy"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, path in enumerate(paths, start=1)
    ]


def _drain(transport: MqttTransport) -> list[tuple[str, bytes]]:
    items = []
    while (item := transport.get(timeout=0.5)) is not None:
        items.append(item)
    return items


def test_a_device_revoked_mid_run_is_not_waited_for_by_the_running_coordinator(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Prepare: a signed run of two provisioned devices with a long round deadline
    paths, heldout = digits.write_demo_data(tmp_path / "data", 2, alpha=100.0, seed=0)
    coordinator = subprocess.Popen(
        [
            BIN / "fedprune-coordinator",
            *fleet.flags("coordinator", "coordinator"),
            *("--run", "revoke", "--min-clients", "2", "--rounds", "5", "--round-timeout", "90"),
            *("--begin-round", "1", "--end-round", "3", "--install-wait", "0", "-q"),
            *("--heldout", heldout, "--out", tmp_path / "runs", "--model", "mlp"),
            *("--signing-key", fleet.folder / "coordinator/signing.key"),
            *("--device-keys", fleet.folder / "coordinator/device-keys"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    devices = _litert_devices(fleet, tmp_path, "revoke", paths)
    metrics = tmp_path / "runs" / "revoke" / "metrics.jsonl"

    # Execute: once round 1 is in, revoke pi-2 as the operator does; its connection stays up
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    revoked_at = time.monotonic()
    subprocess.run(
        [BIN / "fedprune-provision", "revoke", fleet.folder, "pi-2"], check=True, timeout=60
    )
    for name in ("crl.pem", "acl"):
        shutil.copy(fleet.folder / "broker" / name, fleet.etc / name)
    fleet.broker.send_signal(signal.SIGHUP)
    _, err = coordinator.communicate(timeout=300)
    finished = time.monotonic()
    for device in devices:
        device.kill()
        device.wait()

    # Assert: the run went on without pi-2 and never waited out a deadline for it
    assert coordinator.returncode == 0, err[-3000:]
    rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rounds) == 5
    assert rounds[0]["selected"] == 2
    assert rounds[-1]["selected"] == rounds[-1]["reported"] == 1
    assert all(r["seconds"] < 30 for r in rounds)
    assert finished - revoked_at < 90


def test_a_device_of_a_profile_reads_only_that_profiles_deployments(fleet: Fleet) -> None:
    # Prepare: a Pi 4 added to the fleet with its profile; the broker reloads its files
    subprocess.run(
        [BIN / "fedprune-provision", "add", fleet.folder, "pi-9", "--profile", "raspberry-pi-4"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name in ("crl.pem", "acl"):
        shutil.copy(fleet.folder / "broker" / name, fleet.etc / name)
    fleet.broker.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    device = MqttTransport(fleet.settings("devices/pi-9", "device"), client_id="pi-9")
    device.subscribe("fedprune/v1/r/deploy/#")
    coordinator = MqttTransport(fleet.settings("coordinator", "coordinator"), client_id="x")

    # Execute: deployments for its profile and for another
    for profile in ("raspberry-pi-4", "generic-x86-64"):
        coordinator.publish(f"fedprune/v1/r/deploy/{profile}", b"manifest")
        coordinator.publish(f"fedprune/v1/r/deploy/{profile}/chunks/0", b"model")
    coordinator.flush(timeout=5)
    seen = sorted(topic for topic, _ in _drain(device))
    for transport in (device, coordinator):
        transport.close()

    # Assert
    assert seen == [
        "fedprune/v1/r/deploy/raspberry-pi-4",
        "fedprune/v1/r/deploy/raspberry-pi-4/chunks/0",
    ]


def _away_from_the_model(round_: int, model: Model) -> tuple[list[np.ndarray], int]:
    """A stolen device's update: the model pushed towards its negative (where it is kept), its
    L2 norm just inside the fixed limit (1e4), claiming 10,000,000 samples."""
    kept = [w if m is None else w * m for w, m in zip(model.weights, model.masks, strict=True)]
    return [w * (-9_900 / l2_norm(kept)) for w in kept], 10_000_000


@pytest.mark.parametrize("fleet", [3], indirect=True)
def test_one_stolen_device_of_three_cannot_steer_a_provisioned_run_with_its_defaults(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Prepare: a signed run with every default but its size; pi-3's bundle is in an attacker's
    # hands: it declares and claims 10,000,000 samples and sends near-limit updates every round
    paths, heldout = digits.write_demo_data(tmp_path / "data", 2, alpha=100.0, seed=0)
    rounds = 4
    coordinator = subprocess.Popen(
        [
            BIN / "fedprune-coordinator",
            *fleet.flags("coordinator", "coordinator"),
            *("--run", "stolen", "--min-clients", "3", "--rounds", str(rounds)),
            *("--begin-round", "1", "--end-round", "3", "--install-wait", "0"),
            *("--heldout", heldout, "--out", tmp_path / "runs", "--model", "mlp"),
            *("--signing-key", fleet.folder / "coordinator/signing.key"),
            *("--device-keys", fleet.folder / "coordinator/device-keys"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    home = fleet.folder / "devices" / "pi-3"
    attacker = StolenDevice(
        fleet.settings("devices/pi-3", "device"),
        run="stolen",
        client_id="pi-3",
        rounds=rounds,
        declared=10_000_000,
        craft=_away_from_the_model,
        signer=load_signing_key(home / "signing.key"),
    )
    attacker.start()
    devices = _litert_devices(fleet, tmp_path, "stolen", paths)

    # Execute
    _, err = coordinator.communicate(timeout=400)
    attacker.stop.set()
    attacker.join(10)
    for device in devices:
        device.wait(60)

    # Assert: every attack was taken in and left out (the screened default); the honest devices
    # were never rejected (the model never left their norm limit); the model learned and deployed
    assert coordinator.returncode == 0, err[-3000:]
    run = tmp_path / "runs" / "stolen"
    results = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert attacker.answered == list(range(1, rounds + 1))
    assert [r["reported"] for r in results] == [3] * rounds
    assert [r["rejected"] for r in results] == [{}] * rounds
    assert [r["left_out"] for r in results] == [1] * rounds
    assert [r["clipped"] >= 1 for r in results] == [True] * rounds
    for r in range(1, rounds + 1):
        report = json.loads((run / "rounds" / f"round-{r:04d}.json").read_text())
        assert report["left_out"] == ["pi-3"]
        assert report["capped"] == ["pi-3"]
    assert results[-1]["accuracy"] >= 0.8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["unhealthy"] is None
    assert "aggregation screened tolerates 1 Byzantine device(s) of at least 3" in err
