"""fedprune-provision's files: accounts, the ACL, device bundles (no broker needed)."""

from __future__ import annotations

import tarfile
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from fedprune.coordinator import provision, provision_cli
from fedprune.coordinator.broker import queue_settings
from fedprune.protocol.errors import ConfigError


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "fleet"
    provision.init(path, hosts=["broker.lan", "10.0.0.5"], port=8883, devices=["pi-1", "pi-2"])
    return path


def test_init_writes_a_ca_a_broker_and_an_account_per_device(folder: Path) -> None:
    # Execute
    ca = x509.load_pem_x509_certificate((folder / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "broker" / "server.crt").read_bytes())
    device = x509.load_pem_x509_certificate((folder / "devices/pi-1/device.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    config = tomllib.loads((folder / "devices/pi-1/device.toml").read_text())
    acl = (folder / "broker/acl").read_text().splitlines()
    users = [line.removeprefix("user ") for line in acl if line.startswith("user ")]
    conf = (folder / "broker/mosquitto.conf").read_text().splitlines()

    # Assert: certificates chain to the CA; the broker answers to both names; keys are private
    assert server.issuer == ca.subject and device.issuer == ca.subject
    assert names.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert device.subject.rfc4514_string() == "CN=pi-1"
    assert config == {
        "broker": "mqtts://broker.lan:8883",
        "ca": "ca.crt",
        "cert": "device.crt",
        "key": "device.key",
        "signing_key": "signing.key",
        "coordinator_key": "coordinator.pub",
        "id": "pi-1",
    }
    # The certificate is the account: its common name is the user (no password anywhere)
    assert sorted(users) == ["fedprune-coordinator", "fedprune-monitor", "pi-1", "pi-2"]
    assert {"require_certificate true", "use_identity_as_username true"} <= set(conf)
    assert not any(line.startswith("password_file") for line in conf)
    assert not list(folder.rglob("credentials.toml"))
    assert sorted(p.name for p in (folder / "coordinator/device-keys").iterdir()) == [
        "pi-1.pub",
        "pi-2.pub",
    ]
    private_files = (
        "devices/pi-1/device.key",
        "ca/ca.key",
        "devices/pi-1/signing.key",
        "coordinator/signing.key",
    )
    for private in private_files:
        assert (folder / private).stat().st_mode & 0o077 == 0, private


def test_the_acl_lets_a_device_write_only_its_own_topics(folder: Path) -> None:
    # Execute: the ACL's blocks, one per account
    blocks = (folder / "broker" / "acl").read_text().split("\n\n")

    # Assert
    pi1 = next(block for block in blocks if block.startswith("user pi-1\n")).splitlines()
    writes = [line for line in pi1 if line.startswith("topic write")]
    assert writes == [
        "topic write fedprune/v1/+/clients/pi-1/status",
        "topic write fedprune/v1/+/clients/pi-1/update/+/+",  # update/<round>/<chunk>, no deeper
    ]
    assert not any("pi-2" in line for line in pi1)
    # The monitor reads what it shows, not the devices' updates (made from their private data)
    monitor = next(block for block in blocks if block.startswith("user fedprune-monitor\n"))
    assert monitor.splitlines()[1:] == [
        "topic read fedprune/v1/+/telemetry",
        "topic read fedprune/v1/+/coordinator/status",
        "topic read fedprune/v1/+/metrics",
    ]


def test_the_broker_refuses_a_message_larger_than_a_runs_chunks(folder: Path) -> None:
    conf = (folder / "broker" / "mosquitto.conf").read_text().splitlines()

    assert f"max_packet_size {provision.MAX_PACKET}" in conf
    assert 1024 * 1024 < provision.MAX_PACKET < 4 * 1024 * 1024


def test_a_bundle_holds_what_the_device_needs_and_not_the_ca_key(folder: Path) -> None:
    # Execute
    with tarfile.open(folder / "devices" / "pi-2.tar.gz") as tar:
        names = sorted(tar.getnames())

    # Assert
    assert names == [
        "pi-2",
        "pi-2/ca.crt",
        "pi-2/coordinator.pub",
        "pi-2/device.crt",
        "pi-2/device.key",
        "pi-2/device.toml",
        "pi-2/signing.key",
    ]


def test_adding_and_revoking_devices_updates_accounts_and_acl(folder: Path) -> None:
    # Execute
    provision.add(folder, ["pi-3"])
    provision.revoke(folder, ["pi-1"])

    # Assert
    fleet = provision.Fleet.read(folder)
    assert fleet.devices == {"pi-1": "revoked", "pi-2": "active", "pi-3": "active"}
    acl = (folder / "broker" / "acl").read_text()
    assert "user pi-1\n" not in acl and "user pi-3\n" in acl
    keys = sorted(p.stem for p in (folder / "coordinator/device-keys").iterdir())
    assert keys == ["pi-2", "pi-3"]


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda f: provision.init(f, hosts=["h"]), "already provisioned"),
        (lambda f: provision.add(f, ["pi-1"]), "device 'pi-1' already has an account"),
        (lambda f: provision.add(f, ["../etc"]), "device id '../etc': use letters, digits"),
        (lambda f: provision.revoke(f, ["pi-9"]), "no active device 'pi-9'"),
        (lambda f: provision.add(f.parent, ["x"]), "not a provisioned folder"),
    ],
    ids=["init-twice", "duplicate", "path-as-id", "unknown", "not-provisioned"],
)
def test_mistakes_are_one_line_config_errors(folder: Path, action: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        action(folder)  # type: ignore[operator]


def test_device_names_skip_the_taken_ones() -> None:
    assert provision.device_names("pi", 3, taken=["pi-2"]) == ["pi-1", "pi-3", "pi-4"]


def test_the_broker_keeps_a_rounds_backlog_for_the_fleet_and_forgets_dead_sessions(
    folder: Path,
) -> None:
    # Execute
    lines = (folder / "broker" / "mosquitto.conf").read_text().splitlines()

    # Assert: room for each device's update (1 MiB) queued for the coordinator, at least a
    # thousand devices' worth, in bytes while mosquitto can hold the number (32 bits); a
    # persistent session of a client gone for an hour is dropped
    assert set(queue_settings(2)) <= set(lines)
    assert "max_queued_bytes 1048576000" in lines
    assert "persistent_client_expiration 1h" in lines
    assert queue_settings(2000) == [
        "max_queued_messages 100000",
        "max_queued_bytes 2097152000",
        "persistent_client_expiration 1h",
    ]
    assert queue_settings(50_000) == [
        "max_queued_messages 500000",
        "persistent_client_expiration 1h",
    ]


def _revoked_serials(folder: Path) -> list[int]:
    crl = x509.load_pem_x509_crl((folder / "broker" / "crl.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((folder / "ca" / "ca.crt").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc == ca.not_valid_after_utc  # an expired list refuses everyone
    return sorted(r.serial_number for r in crl)


def _serial(folder: Path, device: str) -> int:
    cert = (folder / "devices" / device / "device.crt").read_bytes()
    return x509.load_pem_x509_certificate(cert).serial_number


def test_a_revoked_certificate_stays_on_the_list_when_its_id_comes_back(folder: Path) -> None:
    # Prepare: the list is empty at first
    assert _revoked_serials(folder) == []
    stolen = _serial(folder, "pi-1")

    # Execute: pi-1 is revoked, then the id is given a new account
    provision.revoke(folder, ["pi-1"])
    revoked = _revoked_serials(folder)
    provision.add(folder, ["pi-1"])

    # Assert: the old certificate stays refused; the new one is not
    assert revoked == [stolen]
    assert _revoked_serials(folder) == [stolen]
    assert _serial(folder, "pi-1") != stolen


def test_revoking_needs_the_ca_key_and_changes_nothing_without_it(folder: Path) -> None:
    (folder / "ca" / "ca.key").rename(folder / "offline.key")

    with pytest.raises(ConfigError, match="cannot read the fleet's CA"):
        provision.revoke(folder, ["pi-1"])

    assert provision.Fleet.read(folder).devices["pi-1"] == "active"
    assert (folder / "coordinator" / "device-keys" / "pi-1.pub").exists()


def test_the_command_says_to_keep_the_ca_key_offline_and_what_revoking_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet"

    assert provision_cli.main(["init", str(fleet), "--host", "broker.lan", "--devices", "1"]) == 0
    said = capsys.readouterr().out
    assert provision_cli.main(["revoke", str(fleet), "device-1"]) == 0
    revoked = capsys.readouterr().out

    assert f"keep {fleet / 'ca' / 'ca.key'} offline" in said
    assert "drops them within 2 s" in revoked
    assert not (fleet / "coordinator" / "device-keys" / "device-1.pub").exists()


def test_accounts_can_be_scoped_to_runs_and_a_devices_profile(tmp_path: Path) -> None:
    # Execute: a fleet for run "kitchen" only, its devices Pi 4s
    fleet = tmp_path / "fleet"
    provision.init(
        fleet, hosts=["broker.lan"], devices=["pi-1"], runs=["kitchen"], profile="raspberry-pi-4"
    )
    blocks = (fleet / "broker" / "acl").read_text().split("\n\n")

    # Assert: every rule names the run; the device reads only its profile's deployments
    pi1 = next(b for b in blocks if b.startswith("user pi-1\n")).splitlines()[1:]
    monitor = next(b for b in blocks if b.startswith("user fedprune-monitor\n")).splitlines()[1:]
    assert all("fedprune/v1/kitchen/" in rule for rule in pi1 + monitor)
    deploy = [rule for rule in pi1 if "/deploy/" in rule]
    assert deploy == [
        "topic read fedprune/v1/kitchen/deploy/raspberry-pi-4",
        "topic read fedprune/v1/kitchen/deploy/raspberry-pi-4/#",
    ]
    config = tomllib.loads((fleet / "devices" / "pi-1" / "device.toml").read_text())
    assert (config["run"], config["profile"]) == ("kitchen", "raspberry-pi-4")
    read = provision.Fleet.read(fleet)
    assert (read.runs, read.profiles) == (["kitchen"], {"pi-1": "raspberry-pi-4"})


def test_a_fleet_file_written_before_runs_and_profiles_still_reads(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text(
        'hosts = ["b"]\nport = 8883\nbroker_dir = "/etc/x"\n[devices]\npi-1 = "active"\n'
    )

    fleet = provision.Fleet.read(tmp_path)

    assert (fleet.runs, fleet.profiles, fleet.scopes()) == ([], {}, ["+"])
