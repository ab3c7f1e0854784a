"""Command-line pieces shared by the commands: value types and the broker's options."""

from __future__ import annotations

import argparse

from fedprune.edge_client.connection import PASSWORD_ENV, USERNAME_ENV, BrokerSettings
from fedprune.edge_client.errors import ConfigError
from fedprune.edge_client.topics import check_name


def at_least_one(text: str) -> int:
    """An argparse ``type``: a whole number >= 1, or a usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def name(text: str) -> str:
    """An argparse ``type`` for run names and client ids (:func:`topics.check_name`'s rule)."""
    try:
        return check_name(text, "name")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("name ")) from None


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    """``--broker`` and what proves who we are to it; the same for every command."""
    group = p.add_argument_group(
        "broker",
        f"Credentials come from --credentials or from {USERNAME_ENV} and {PASSWORD_ENV}, never "
        "from the command line.",
    )
    group.add_argument(
        "--broker",
        default="mqtt://127.0.0.1:1883",
        metavar="URL",
        help="mqtt://host:1883 or mqtts://host:8883 (TLS); mqtt5:// and mqtts5:// speak MQTT 5 "
        "(default: %(default)s)",
    )
    group.add_argument("--ca", metavar="FILE", help="CA certificate that signed the broker's")
    group.add_argument("--cert", metavar="FILE", help="this side's certificate (mutual TLS)")
    group.add_argument("--key", metavar="FILE", help="the private key of --cert")
    group.add_argument(
        "--credentials",
        metavar="FILE",
        help='TOML file with username = "..." and password = "..." for the broker',
    )


def broker_settings(args: argparse.Namespace) -> BrokerSettings:
    """The settings ``add_broker_arguments`` collected (the environment fills in credentials)."""
    return BrokerSettings.load(
        args.broker, ca=args.ca, cert=args.cert, key=args.key, credentials=args.credentials
    )
