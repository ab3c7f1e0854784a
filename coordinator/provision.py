"""Provisioning a fleet: a CA, certificates and broker accounts, and mosquitto's configuration.

It writes files and nothing else. One folder holds a deployment::

    DIR/fleet.toml                    the broker address and every account (active or revoked)
    DIR/ca/ca.crt, ca.key             the fleet's CA (keep ca.key off the devices)
    DIR/broker/                       mosquitto.conf, server.crt/.key, ca.crt, crl.pem, acl
    DIR/coordinator/, DIR/monitor/    each: ca.crt, <name>.crt/.key;
                                      monitor/monitor.toml and coordinator.pub for fedprune-monitor
    DIR/coordinator/signing.key       the coordinator's Ed25519 signing key; coordinator.pub
    DIR/coordinator/device-keys/      <id>.pub: every enrolled device's verify key
    DIR/devices/<id>/                 ca.crt, device.crt/.key, device.toml,
                                      signing.key (the device's) and coordinator.pub
    DIR/devices/<id>.tar.gz           the same folder packed, to copy onto the device

The broker needs TLS with a client certificate signed by the CA, and the certificate is the
account (``use_identity_as_username``: its common name is the user name and, with
``use_username_as_clientid``, the MQTT client id), so one device's certificate cannot log in as
another device whatever it claims. The ACL lets a device publish only its own
``clients/<id>/status`` and ``clients/<id>/update/...``, and read only what devices need; the
coordinator account owns every fedprune topic and the monitor account reads a run's telemetry,
status and metrics only. Revoking a device puts its certificate on the CA's revocation list
(``crl.pem``, which mosquitto reads again on SIGHUP) and takes its ACL block away. Certificates,
keys and the list come from ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tarfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedprune.coordinator.broker import UPDATE_ALLOWANCE, queue_settings
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.signing import new_keypair
from fedprune.protocol.topics import check_name

COORDINATOR = "fedprune-coordinator"
MONITOR = "fedprune-monitor"
FLEET_FILE = "fleet.toml"
_CA_DAYS, _LEAF_DAYS = 3650, 1095

# What a device account may do, in every run: publish its own status and updates, read its inbox
# and what the coordinator publishes for all devices.
MONITOR_ACL = [
    "read fedprune/v1/{run}/telemetry",
    "read fedprune/v1/{run}/coordinator/status",
    "read fedprune/v1/{run}/metrics",
]
"""What the monitor account reads: the run's telemetry, status and metrics, never a device's
updates (made from its private data) or inbox."""

MAX_PACKET = 2 * 1024 * 1024 + 64 * 1024
"""The largest MQTT packet the broker takes: a chunk as large as any profile's message limit
(1 MiB) with room to spare for a run that chunks larger; a 200 MiB message is refused at the
door."""

DEVICE_ACL = [
    "write fedprune/v1/{run}/clients/{id}/status",
    "write fedprune/v1/{run}/clients/{id}/update/+/+",
    "read fedprune/v1/{run}/clients/{id}/inbox",
    "read fedprune/v1/{run}/coordinator/status",
    "read fedprune/v1/{run}/spec",
    "read fedprune/v1/{run}/round",
    "read fedprune/v1/{run}/metrics",
    "read fedprune/v1/{run}/model/#",
    "read fedprune/v1/{run}/artifact/#",
    "read fedprune/v1/{run}/deploy/{profile}",
    "read fedprune/v1/{run}/deploy/{profile}/#",
]
"""A device's rules, for each run the fleet serves (``+``: any) and its profile (``+``: any)."""


@dataclass(kw_only=True)
class Fleet:
    """``fleet.toml``: where the broker listens and which accounts exist."""

    hosts: list[str]
    port: int
    broker_dir: str  # where mosquitto will read its files (paths in mosquitto.conf)
    devices: dict[str, str] = field(default_factory=dict)  # id -> "active" | "revoked"
    runs: list[str] = field(default_factory=list)  # the runs its accounts may take part in; [] any
    profiles: dict[str, str] = field(default_factory=dict)  # id -> its profile (deployments)
    revoked: list[str] = field(default_factory=list)  # serial numbers (hex) of revoked certificates

    def scopes(self) -> list[str]:
        """The run levels of the ACL's topics: the fleet's runs, or ``+`` (any)."""
        return self.runs or ["+"]

    @classmethod
    def read(cls, folder: Path) -> Fleet:
        path = folder / FLEET_FILE
        try:
            table = tomllib.loads(path.read_text())
            return cls(
                hosts=list(table["hosts"]),
                port=int(table["port"]),
                broker_dir=str(table["broker_dir"]),
                devices=dict(table.get("devices", {})),
                runs=list(table.get("runs", [])),
                profiles=dict(table.get("profiles", {})),
                revoked=list(table.get("revoked", [])),
            )
        except FileNotFoundError as exc:
            raise ConfigError(f"{folder}: not a provisioned folder (no {FLEET_FILE})") from exc
        except (OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable ({exc})") from exc

    def write(self, folder: Path) -> None:
        table = {
            "hosts": self.hosts,
            "port": self.port,
            "broker_dir": self.broker_dir,
            "runs": self.runs,
            "devices": self.devices,
            "profiles": self.profiles,
            "revoked": self.revoked,
        }
        _write(folder / FLEET_FILE, tomli_w.dumps(table).encode())

    @property
    def url(self) -> str:
        return f"mqtts://{self.hosts[0]}:{self.port}"


def init(
    folder: Path,
    *,
    hosts: Sequence[str],
    port: int = 8883,
    devices: Sequence[str] = (),
    broker_dir: Path | None = None,
    runs: Sequence[str] = (),
    profile: str | None = None,
) -> Fleet:
    """A new deployment in ``folder`` (which must not hold one): CA, broker, coordinator and
    monitor accounts, and ``devices``."""
    if (folder / FLEET_FILE).exists():
        raise ConfigError(f"{folder}: already provisioned; add devices with 'add'")
    if not hosts:
        raise ConfigError("give the broker's host name or address (--host), as devices reach it")
    if not 1 <= port <= 65535:
        raise ConfigError(f"port must be in 1..65535, got {port}")
    ca_key, ca_cert = _new_ca()
    _write_pem(folder / "ca", "ca", ca_key, ca_cert)
    broker = (broker_dir or folder / "broker").absolute()
    for run in runs:
        check_name(run, "run name")
    fleet = Fleet(hosts=list(hosts), port=port, broker_dir=str(broker), runs=list(runs))
    server_key, server_cert = _leaf(ca_key, ca_cert, "fedprune-broker", server_names=hosts)
    _write_pem(folder / "broker", "server", server_key, server_cert, ca_cert)
    _readable_by_mosquitto(folder / "broker" / "server.key")
    for name in (COORDINATOR, MONITOR):
        _account(folder, fleet, folder / name.removeprefix("fedprune-"), name, "client")
    home = folder / "coordinator"
    new_keypair(home / "signing.key", home / "coordinator.pub")
    (home / "device-keys").mkdir(exist_ok=True)
    monitor = folder / "monitor"
    shutil.copy(home / "coordinator.pub", monitor / "coordinator.pub")
    _write(monitor / "monitor.toml", tomli_w.dumps(_monitor_config(fleet)).encode())
    fleet.write(folder)
    add(folder, devices, profile=profile)
    return Fleet.read(folder)


def add(folder: Path, devices: Iterable[str], *, profile: str | None = None) -> list[Path]:
    """New device accounts, of ``profile`` if given (they then read only its deployments);
    returns the bundle (``.tar.gz``) of each."""
    fleet = Fleet.read(folder)
    if profile is not None:
        check_name(profile, "profile")
    bundles = []
    for device in devices:
        check_name(device, "device id")
        if device in (COORDINATOR, MONITOR) or fleet.devices.get(device) == "active":
            raise ConfigError(f"device {device!r} already has an account")
        home = folder / "devices" / device
        _account(folder, fleet, home, device, "device")
        new_keypair(home / "signing.key", folder / "coordinator" / "device-keys" / f"{device}.pub")
        shutil.copy(folder / "coordinator" / "coordinator.pub", home / "coordinator.pub")
        if profile is not None:
            fleet.profiles[device] = profile
        _write(home / "device.toml", tomli_w.dumps(_device_config(fleet, device)).encode())
        fleet.devices[device] = "active"
        fleet.write(folder)
        bundles.append(_pack(home))
    _write_broker_config(folder, fleet)
    return bundles


def revoke(folder: Path, devices: Iterable[str]) -> None:
    """Remove device accounts: their certificates go on the revocation list, their ACL blocks and
    verify keys go; reload mosquitto to apply it (a running coordinator reads its keys again)."""
    fleet = Fleet.read(folder)
    _read_ca(folder)  # the list is signed with the CA's key: say so before changing anything
    for device in devices:
        if fleet.devices.get(device) != "active":
            raise ConfigError(f"no active device {device!r} in {folder}")
        (folder / "coordinator" / "device-keys" / f"{device}.pub").unlink(missing_ok=True)
        cert = (folder / "devices" / device / "device.crt").read_bytes()
        fleet.revoked.append(f"{x509.load_pem_x509_certificate(cert).serial_number:x}")
        fleet.devices[device] = "revoked"
        fleet.write(folder)
    _write_broker_config(folder, fleet)


def device_names(prefix: str, count: int, taken: Iterable[str] = ()) -> list[str]:
    """``count`` new ids ``<prefix>-1``, ``<prefix>-2``, ... skipping those ``taken``."""
    used, n = set(taken), 0
    names: list[str] = []
    while len(names) < count:
        n += 1
        if f"{prefix}-{n}" not in used:
            names.append(f"{prefix}-{n}")
    return names


# -- accounts -------------------------------------------------------------------------------------


def _account(folder: Path, fleet: Fleet, home: Path, name: str, role: str) -> None:
    """A certificate (its common name is the account) and its key for ``name``, in ``home``."""
    ca_key, ca_cert = _read_ca(folder)
    key, cert = _leaf(ca_key, ca_cert, name, client=True)
    stem = "device" if role == "device" else name.removeprefix("fedprune-")
    _write_pem(home, stem, key, cert, ca_cert)


def _device_config(fleet: Fleet, device: str) -> dict[str, str]:
    """What ``fedprune-client --config`` reads; paths relative to the bundle."""
    return {
        "broker": fleet.url,
        "ca": "ca.crt",
        "cert": "device.crt",
        "key": "device.key",
        "signing_key": "signing.key",
        "coordinator_key": "coordinator.pub",
        "id": device,
        **({"profile": fleet.profiles[device]} if device in fleet.profiles else {}),
        **({"run": fleet.runs[0]} if len(fleet.runs) == 1 else {}),
    }


def _monitor_config(fleet: Fleet) -> dict[str, str]:
    """What ``fedprune-monitor --config`` reads; paths relative to the monitor's folder."""
    return {
        "broker": fleet.url,
        "ca": "ca.crt",
        "cert": "monitor.crt",
        "key": "monitor.key",
        "coordinator_key": "coordinator.pub",
    }


def _pack(home: Path) -> Path:
    bundle = home.with_name(home.name + ".tar.gz")
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(home, arcname=home.name)
    bundle.chmod(0o600)
    return bundle


def _write_broker_config(folder: Path, fleet: Fleet) -> None:
    broker = Path(fleet.broker_dir)
    _write_crl(folder, fleet)
    lines = [
        "# Written by fedprune-provision: a TLS listener where a client certificate of the fleet's",
        "# CA is the account (its common name), no anonymous access, and the fedprune ACL.",
        "# Reload mosquitto after adding or revoking devices.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {broker / 'acl'}",
        f"listener {fleet.port}",
        f"cafile {broker / 'ca.crt'}",
        f"certfile {broker / 'server.crt'}",
        f"keyfile {broker / 'server.key'}",
        f"crlfile {broker / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "# Room for a round's updates queued for the coordinator while it verifies them or is",
        "# away (its session is kept): mosquitto's default of 1000 messages would drop the rest.",
        f"# Sized for {len(fleet.devices)} devices' updates of up to"
        f" {UPDATE_ALLOWANCE // 2**20} MiB each: docs/scaling.md.",
        *queue_settings(len(fleet.devices)),
        "# Nothing larger than a run's chunks gets in (a 200 MiB message would reach the",
        "# coordinator whole).",
        f"max_packet_size {MAX_PACKET}",
    ]
    _write(folder / "broker" / "mosquitto.conf", ("\n".join(lines) + "\n").encode())
    acl = [
        "# Written by fedprune-provision from fleet.toml: one account per device (its id, which is",
        "# also its MQTT client id), the coordinator and a read-only monitor.",
        f"user {COORDINATOR}",
        "topic readwrite fedprune/#",
        "",
        f"user {MONITOR}",
        *(f"topic {rule.format(run=run)}" for run in fleet.scopes() for rule in MONITOR_ACL),
    ]
    for device, state in fleet.devices.items():
        profile = fleet.profiles.get(device, "+")
        if state == "active":
            acl += [
                "",
                f"user {device}",
                *(
                    f"topic {rule.format(id=device, run=run, profile=profile)}"
                    for run in fleet.scopes()
                    for rule in DEVICE_ACL
                ),
            ]
    _write(folder / "broker" / "acl", ("\n".join(acl) + "\n").encode())


# -- certificates ---------------------------------------------------------------------------------


def _write_crl(folder: Path, fleet: Fleet) -> None:
    """broker/crl.pem: the revoked certificates, signed by the CA (valid as long as the CA is:
    an expired list would refuse every connection)."""
    ca_key, ca_cert = _read_ca(folder)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(ca_cert.not_valid_after_utc)
    )
    for serial in fleet.revoked:  # every certificate ever revoked, a re-added device's old one too
        revoked = x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
        builder = builder.add_revoked_certificate(revoked.revocation_date(now).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(folder / "broker" / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprune fleet CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    server_names: Sequence[str] = (),
    client: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in server_names]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _read_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((folder / "ca" / "ca.key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate((folder / "ca" / "ca.crt").read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder / 'ca'}: cannot read the fleet's CA ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{folder / 'ca' / 'ca.key'}: not the EC key fedprune-provision makes")
    return key, cert


def _write_pem(
    folder: Path,
    stem: str,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    ca: x509.Certificate | None = None,
) -> None:
    pem = serialization.Encoding.PEM
    key_bytes = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(folder / f"{stem}.key", key_bytes, private=True)
    _write(folder / f"{stem}.crt", cert.public_bytes(pem))
    if ca is not None:
        _write(folder / "ca.crt", ca.public_bytes(pem))


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _readable_by_mosquitto(path: Path) -> None:
    """mosquitto started as root drops to the 'mosquitto' user before it reads its key: give
    that group read access when we can (as root, where the group exists)."""
    try:
        if os.geteuid() == 0:
            shutil.chown(path, group="mosquitto")
            path.chmod(0o640)
    except (LookupError, OSError):  # no such group here: the operator sets the owner
        pass
