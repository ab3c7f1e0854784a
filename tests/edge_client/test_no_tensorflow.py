"""The edge client, the protocol and the monitor import, and their CLIs run, on a machine without
TensorFlow installed.

Each test runs a fresh interpreter in which an import hook makes TensorFlow and Keras impossible to
import, as if they were not installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKED = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "keras")

BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc
    import sys

    BLOCKED = {BLOCKED!r}

    class _NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, _NoTensorFlow())
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not block tensorflow")
    """
)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter that sees fedprune as installed (not the checkout)."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_module_of_the_light_packages_imports_without_tensorflow(tmp_path: Path) -> None:
    # Prepare: every module a device or a monitor may load
    code = """
        import importlib
        import pkgutil

        from fedprune import edge_client, monitor, protocol
        names = sorted(
            m.name
            for package in (edge_client, protocol, monitor)
            for m in pkgutil.iter_modules(package.__path__, package.__name__ + ".")
            if m.name not in ("fedprune.edge_client.keras_trainer", "fedprune.edge_client.__main__")
        )
        for name in names:
            importlib.import_module(name)
        print(",".join(names))
        print(",".join(sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED)))
    """

    # Execute
    result = _run(code, tmp_path)

    # Assert
    assert result.returncode == 0, result.stderr
    imported, heavy = result.stdout.splitlines()
    assert {
        "fedprune.edge_client.cli",
        "fedprune.edge_client.client",
        "fedprune.protocol.envelope",
        "fedprune.protocol.transport",
        "fedprune.monitor.cli",
    } <= set(imported.split(","))
    assert heavy == ""


def test_the_client_cli_prints_its_help_without_tensorflow(tmp_path: Path) -> None:
    # Prepare
    code = """
        import runpy
        sys.argv = ["fedprune-client", "--help"]
        runpy.run_module("fedprune.edge_client", run_name="__main__", alter_sys=True)
    """

    # Execute
    result = _run(code, tmp_path)

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fedprune-client")
    assert "--broker" in result.stdout and "--data" in result.stdout


def test_the_client_cli_reports_a_missing_data_file_without_tensorflow(tmp_path: Path) -> None:
    # Prepare
    code = """
        from fedprune.edge_client.cli import main
        sys.exit(main(["--data", "missing.npz"]))
    """

    # Execute
    result = _run(code, tmp_path)

    # Assert
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == "fedprune-client: error: missing.npz: no such data file"


def test_the_keras_trainer_without_tensorflow_is_a_config_error(tmp_path: Path) -> None:
    # Prepare
    code = """
        from fedprune.protocol.errors import ConfigError
        from fedprune.edge_client.trainer import make_trainer
        from fedprune.protocol.messages import Spec

        spec = Spec(model_json="{}", input_shape=[4], optimizer="sgd", learning_rate=0.1,
                    momentum=0.0, local_epochs=1, batch_size=8)
        try:
            make_trainer("keras", spec)
        except ConfigError as exc:
            print(exc)
    """

    # Execute
    result = _run(code, tmp_path)

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "trainer 'keras' needs tensorflow, which is not installed;"
        " install it or choose another backend"
    )


def test_the_small_modules_import_without_paho_numpy_or_litert(tmp_path: Path) -> None:
    # Prepare: what a monitor or an error printer needs, and nothing heavier
    code = """
        import fedprune.edge_client
        import fedprune.protocol.chunks
        import fedprune.protocol.envelope
        import fedprune.protocol.errors
        import fedprune.protocol.messages
        import fedprune.protocol.topics
        heavy = ("paho", "numpy", "ai_edge_litert")
        print(",".join(sorted(n for n in sys.modules if n.partition(".")[0] in heavy)))
        print(fedprune.edge_client.EdgeClient.__module__)
    """

    # Execute
    result = _run(code, tmp_path)

    # Assert: the client resolves from the package, lazily (then it loads what it needs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["", "fedprune.edge_client.client"]


def test_the_monitor_and_its_views_need_neither_numpy_nor_litert(tmp_path: Path) -> None:
    # Prepare: the monitor extra installs paho, msgpack, PyNaCl and rich, not numpy or LiteRT
    code = """
        import fedprune.monitor.cli
        import fedprune.monitor.dashboard
        import fedprune.monitor.view
        heavy = ("numpy", "ai_edge_litert")
        print(",".join(sorted(n for n in sys.modules if n.partition(".")[0] in heavy)))
    """

    # Execute
    result = _run(code, tmp_path)

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [""]
