"""Command-line pieces shared by the commands: value types and the broker's options."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from fedprune.protocol.connection import PASSWORD_ENV, USERNAME_ENV, BrokerSettings
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.topics import check_name


def at_least_one(text: str) -> int:
    """An argparse ``type``: a whole number >= 1, or a usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse ``type``: a number of seconds above 0, or a usage error naming the value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
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


def add_insecure_argument(p: argparse.ArgumentParser) -> None:
    """``--insecure``: run unsigned against a broker that is not on this machine."""
    p.add_argument(
        "--insecure",
        action="store_true",
        help="run unsigned against a broker that is not on this machine, where anyone who can"
        " publish can steer the run (a warning says so every hour)",
    )


def broker_settings(args: argparse.Namespace) -> BrokerSettings:
    """The settings ``add_broker_arguments`` collected (the environment fills in credentials)."""
    return BrokerSettings.load(
        args.broker, ca=args.ca, cert=args.cert, key=args.key, credentials=args.credentials
    )


def load_toml(path: Path) -> dict[str, Any]:
    """A TOML config file's table, or a one-line ``ConfigError`` saying why there is none."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML config file ({exc})") from exc


def read_config(
    path: Path, keys: dict[str, tuple[str, bool]], flags: frozenset[str] = frozenset()
) -> dict[str, str | bool]:
    """A config file (a device's, a monitor's) as argparse defaults (dest -> value). ``keys``
    maps each key it may hold to (argparse dest, is a path); paths are made relative to it.
    The dests in ``flags`` are on/off switches (``forever = true``); the rest are strings."""
    table = load_toml(path)
    defaults: dict[str, str | bool] = {}
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(keys)})")
        if keys[key][0] in flags:
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: {key} must be true or false, got {value!r}")
            defaults[keys[key][0]] = value
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: {key} must be a non-empty string, got {value!r}")
        dest, is_path = keys[key]
        relative = key == "profile" and value.endswith(".toml")  # a profile file beside it
        defaults[dest] = str(path.parent / value) if is_path or relative else value
    return defaults


def add_config_argument(p: argparse.ArgumentParser, keys: dict[str, tuple[str, bool]]) -> None:
    """``--config FILE``: a TOML file that may set any of ``keys`` (:func:`parse_with_config`)."""
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config: any of " + ", ".join(keys) + " (flags override it; relative paths are"
        " relative to the file)",
    )


def parse_with_config(
    p: argparse.ArgumentParser, argv: list[str] | None, keys: dict[str, tuple[str, bool]]
) -> argparse.Namespace:
    """Flags over the ``--config`` file over the built-in defaults."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", type=Path)
    config = early.parse_known_args(argv)[0].config
    if config is not None:
        flags = frozenset(k for k, v in vars(p.parse_args([])).items() if isinstance(v, bool))
        p.set_defaults(**read_config(config, keys, flags))
    return p.parse_args(argv)
