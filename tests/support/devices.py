"""Device processes for integration tests: ``fedprune-client`` as a device runs it.

A test helper, kept out of the installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def start_device(
    broker: str, run: str, client_id: str, data: Path, *flags: str, **popen: Any
) -> subprocess.Popen[Any]:
    """``python -m fedprune.edge_client`` for ``client_id`` with its local ``data``, then
    ``flags``; its output goes nowhere unless ``popen`` says otherwise."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    popen.setdefault("env", dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    command = [
        sys.executable,
        "-m",
        "fedprune.edge_client",
        "--broker",
        broker,
        "--run",
        run,
        "--id",
        client_id,
        "--data",
        str(data),
        *flags,
    ]
    return subprocess.Popen(command, **popen)


def litert(i: int, cache: Path) -> tuple[str, ...]:
    """The flags of the i-th litert device of a test: its seed, trainer and cache, no deploy."""
    return (
        "--seed",
        str(i),
        "--trainer",
        "litert",
        "--cache",
        str(cache / f"cache-{i}"),
        "--no-deploy",
    )
