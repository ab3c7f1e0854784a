"""Shared fixtures: a real mosquitto on a free loopback port, started per test that asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def mosquitto() -> Iterator[str]:
    """URL of a private mosquitto broker (scripts/setup.sh installs it; CI has it)."""
    from coordinator.broker import EmbeddedBroker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run scripts/setup.sh (apt-get install mosquitto)")
    with EmbeddedBroker("mosquitto") as broker:
        yield broker.url
