"""``fedprune-provision``: set up a fleet's CA, broker accounts and mosquitto configuration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedprune import __version__
from fedprune.coordinator import provision
from fedprune.protocol import signing
from fedprune.protocol.errors import FedpruneError, print_error

PROG = "fedprune-provision"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Provision a fleet in one folder: a CA, the broker's TLS certificate, one "
        "account (a certificate: its name is the account) for the coordinator, a read-only monitor "
        "and each device, and mosquitto's configuration (TLS listener, no anonymous access, a "
        "revocation list, an ACL under which a device may publish only its own topics). Each "
        "device gets a bundle to copy onto it (fedprune-client --config BUNDLE/device.toml).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    init = commands.add_parser("init", help="a new deployment (CA, broker, accounts)")
    init.add_argument("folder", type=Path, metavar="DIR")
    init.add_argument(
        "--host",
        dest="hosts",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="how devices reach the broker (repeat for several names); the first is put in "
        "the devices' config",
    )
    init.add_argument("--port", type=int, default=8883, help="TLS port (default: %(default)s)")
    init.add_argument("--devices", type=int, default=0, metavar="N", help="N device accounts")
    init.add_argument("--prefix", default="device", help="device ids: PREFIX-1, PREFIX-2, ...")
    init.add_argument(
        "--run",
        dest="runs",
        action="append",
        default=[],
        metavar="NAME",
        help="a run the accounts may take part in (repeat for several; default: any): devices and "
        "the monitor read and write only those runs' topics",
    )
    _add_profile(init)
    init.add_argument(
        "--broker-dir",
        type=Path,
        metavar="PATH",
        help="where mosquitto will read DIR/broker's files, e.g. /etc/mosquitto/fedprune "
        "(default: DIR/broker)",
    )
    add = commands.add_parser("add", help="new device accounts and bundles")
    add.add_argument("folder", type=Path, metavar="DIR")
    add.add_argument("devices", nargs="*", metavar="ID", help="device ids")
    add.add_argument(
        "--devices",
        dest="count",
        type=int,
        default=0,
        metavar="N",
        help="N more devices named PREFIX-<n>",
    )
    add.add_argument("--prefix", default="device")
    _add_profile(add)
    revoke = commands.add_parser("revoke", help="remove device accounts (then reload mosquitto)")
    revoke.add_argument("folder", type=Path, metavar="DIR")
    revoke.add_argument("devices", nargs="+", metavar="ID")
    seal = commands.add_parser(
        "seal",
        help="encrypt signing keys with a passphrase (from FEDPRUNE_KEY_PASSPHRASE, or the file "
        "FEDPRUNE_KEY_PASSPHRASE_FILE names); what loads them then needs the same",
    )
    seal.add_argument("keys", nargs="+", type=Path, metavar="KEYFILE")
    return p


def _add_profile(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--profile",
        metavar="NAME",
        help="the devices' profile (put in their device.toml): they read only its deployments"
        " (default: any profile's)",
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "init":
            names = provision.device_names(args.prefix, args.devices)
            fleet = provision.init(
                args.folder,
                hosts=args.hosts,
                port=args.port,
                devices=names,
                broker_dir=args.broker_dir,
                runs=args.runs,
                profile=args.profile,
            )
            print(f"provisioned {args.folder}: broker {fleet.url}, {len(names)} device(s)")
            print(f"  broker:      mosquitto -c {args.folder / 'broker' / 'mosquitto.conf'}")
            home = args.folder / "coordinator"
            print(
                f"  coordinator: {_flags(home, 'coordinator', fleet)} --signing-key"
                f" {home / 'signing.key'} --device-keys {home / 'device-keys'}"
            )
            monitor = args.folder / "monitor" / "monitor.toml"
            print(f"  monitor:     fedprune-monitor --config {monitor} --run NAME")
            _bundles(args.folder, names)
            ca_key = args.folder / "ca" / "ca.key"
            print(
                f"keep {ca_key} offline (it signs every certificate of the fleet; 'add' and"
                " 'revoke' need it back): on no broker, coordinator or device"
            )
        elif args.command == "add":
            taken = provision.Fleet.read(args.folder).devices
            names = [*args.devices, *provision.device_names(args.prefix, args.count, taken)]
            provision.add(args.folder, names, profile=args.profile)
            _bundles(args.folder, names)
            print("reload mosquitto to let them in (systemctl reload mosquitto, or kill -HUP)")
        elif args.command == "seal":
            for key in args.keys:
                signing.seal(key)
                print(
                    f"sealed {key}: set {signing.PASSPHRASE_ENV} (or"
                    f" {signing.PASSPHRASE_FILE_ENV}) wherever it is used"
                )
        else:
            provision.revoke(args.folder, args.devices)
            keys = args.folder / "coordinator" / "device-keys"
            print(
                f"revoked {', '.join(args.devices)}; copy crl.pem and acl to the broker and reload"
                " mosquitto (systemctl reload mosquitto,"
                f" or kill -HUP). A coordinator reading {keys} drops them within 2 s."
            )
    except (FedpruneError, OSError) as exc:
        return print_error(PROG, exc)
    return 0


def _flags(home: Path, stem: str, fleet: provision.Fleet) -> str:
    return (
        f"--broker {fleet.url} --ca {home / 'ca.crt'} --cert {home / (stem + '.crt')}"
        f" --key {home / (stem + '.key')}"
    )


def _bundles(folder: Path, names: list[str]) -> None:
    for name in names:
        print(f"  device {name}: copy {folder / 'devices' / (name + '.tar.gz')}, then")
        print(f"      fedprune-client --config {name}/device.toml --data local.npz --profile ...")


if __name__ == "__main__":
    sys.exit(main())
