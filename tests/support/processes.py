"""The commands of integration tests as a user runs them: coordinators, aggregators and devices
(``python -m fedprune...``) against a broker, their options written as keywords.

A test helper, kept out of the installed package; pytest finds it through ``pythonpath``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

QUIET_TF = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
"""The environment of a process that may import TensorFlow, without its start-up chatter."""


def command(module: str, broker: str, *flags: str, **options: object) -> list[str]:
    """``python -m fedprune.<module> --broker BROKER`` with ``options`` as flags
    (``round_timeout=60`` is ``--round-timeout 60``, ``True`` the flag alone), then ``flags``."""
    argv = [sys.executable, "-m", f"fedprune.{module}", "--broker", broker]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return [*argv, *flags]


def coordinator(broker: str, *flags: str, **options: object) -> list[str]:
    """``fedprune-coordinator``'s command line (:func:`command`)."""
    return command("coordinator.cli", broker, *flags, **options)


def aggregator(broker: str, *flags: str, **options: object) -> list[str]:
    """``fedprune-aggregator``'s command line (:func:`command`)."""
    return command("coordinator.aggregator", broker, *flags, **options)


def demo(broker: str, *flags: str, **options: object) -> list[str]:
    """``fedprune-demo``'s command line (:func:`command`): ``broker`` is a URL or its choice of
    broker (``mosquitto``, ``amqtt``, ``auto``)."""
    return command("coordinator.demo", broker, *flags, **options)


def start_device(
    broker: str, run: str, client_id: str, data: Path, *flags: str, **popen: Any
) -> subprocess.Popen[Any]:
    """``fedprune-client`` for ``client_id`` with its local ``data``, then ``flags``; its output
    goes nowhere unless ``popen`` says otherwise."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    popen.setdefault("env", QUIET_TF)
    argv = command("edge_client", broker, *flags, run=run, id=client_id, data=data)
    return subprocess.Popen(argv, **popen)


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
