"""The round-loop tests' harness: the coordinator over an in-memory broker, against scripted
clients (tests/support/round_harness.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from round_harness import Harness, make_harness


@pytest.fixture
def harness() -> Callable[..., Harness]:
    return make_harness()
