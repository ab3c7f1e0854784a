"""Command-line value types shared by the device's commands (fedprune-client, fedprune-infer)."""

from __future__ import annotations

import argparse

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
