"""Command-line value types shared by the device's commands (fedprune-client, fedprune-infer)."""

from __future__ import annotations

import argparse


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
    """An argparse ``type`` for run names and client ids: they become MQTT topic levels, so
    letters, digits, '-', '_' and '.' only."""
    if not text or not all(c.isalnum() or c in "-_." for c in text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '-', '_' or '.' (it becomes an MQTT topic level)"
        )
    return text
