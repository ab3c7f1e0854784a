"""pytest plugin loaded by ``scripts/arm64.sh test`` (``-p arm64_pytest``) inside the ARM Python.

It names the emulated machine in the report header and, when the host could not provide the
pre-built TFLite models (``FEDPRUNE_ARM64_SKIP_MODELS`` holds the reason), skips the tests that use
the ``models`` fixture instead of letting the fixture try to import TensorFlow on ARM.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import pytest


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        litert = metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        litert = "missing"
    cpu = os.environ.get("FEDPRUNE_ARM64_CPU", "?")
    models = os.environ.get("FEDPRUNE_TEST_MODELS", "none")
    return [
        f"arm64: machine {platform.machine()} (qemu-user, -cpu {cpu}), ai-edge-litert {litert},"
        f" test models {models}"
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = os.environ.get("FEDPRUNE_ARM64_SKIP_MODELS")
    if not reason:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "models" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
