"""The edge side on 64-bit ARM: Debian bookworm arm64, Python 3.11, qemu-user (scripts/arm64.sh).

Opt-in with FEDPRUNE_ARM64=1. The first run makes .cache/arm64 (about 40 s and 75 MB of downloads
here, 400 MB on disk; needs root for debootstrap); later runs reuse it. See docs/arm64.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fedprune

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "arm64.sh"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FEDPRUNE_ARM64") != "1",
        reason="emulated ARM64 tests are opt-in: set FEDPRUNE_ARM64=1 (needs debootstrap,"
        " qemu-user-static and root for the first setup; see docs/arm64.md)",
    ),
]

# y = x @ W + b as a TFLite FULLY_CONNECTED model, built on the host in a subprocess so that this
# process never imports TensorFlow.
TINY = textwrap.dedent(
    """
    import sys

    import numpy as np
    import tensorflow as tf

    w = tf.constant(np.load(sys.argv[1])["w"])
    b = tf.constant(np.load(sys.argv[1])["b"])
    module = tf.Module()
    module.f = tf.function(
        lambda x: tf.matmul(x, w) + b, input_signature=[tf.TensorSpec([None, 4], tf.float32)]
    )
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.f.get_concrete_function()], module
    )
    open(sys.argv[2], "wb").write(converter.convert())
    """
)

# Runs under ARM: edge_client.litert (the client's own LiteRT wrapper) on the tiny model.
PREDICT = textwrap.dedent(
    """
    import platform
    import sys
    from pathlib import Path

    import numpy as np

    from fedprune.edge_client.litert import load_interpreter, predict

    interpreter = load_interpreter(Path(sys.argv[1]))
    x = np.load(sys.argv[2])["x"]
    np.save(sys.argv[3], predict(interpreter, x))
    print(platform.machine())
    """
)


def _arm(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def arm64() -> Iterator[None]:
    """The cached ARM userland and wheels, made (or checked) once for this module."""
    done = _arm("setup", timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    yield


def test_setup_gives_aarch64_python_311_with_the_pinned_litert_and_no_tensorflow(
    arm64: None,
) -> None:
    # Execute
    done = _arm(
        "python",
        "-c",
        "import importlib.util as u, json, platform; from importlib import metadata as m;"
        "import ai_edge_litert.interpreter, numpy, paho.mqtt.client, msgpack;"
        "import fedprune, fedprune.edge_client.cli;"
        "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),"
        " 'litert': m.version('ai-edge-litert'), 'numpy': numpy.__version__,"
        " 'fedprune': fedprune.__version__, 'file': fedprune.__file__,"
        " 'tensorflow': u.find_spec('tensorflow') is not None}))",
    )

    # Assert: fedprune is the installed wheel, not the checkout
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout)
    assert facts["machine"] == "aarch64"
    assert facts["python"].startswith("3.11.")
    assert facts["litert"] == "2.3.0"
    assert int(facts["numpy"].split(".")[0]) >= 2
    assert facts["tensorflow"] is False
    assert facts["fedprune"] == fedprune.__version__
    assert Path(facts["file"]).parts[-3:] == ("site", "fedprune", "__init__.py")


def test_a_tflite_model_built_on_the_host_gives_the_same_numbers_under_arm(
    arm64: None, tmp_path: Path
) -> None:
    # Prepare: y = x @ W + b, built with the host's TensorFlow.
    if subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True).returncode:
        pytest.skip("the host Python has no TensorFlow to build the model with")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.savez(tmp_path / "weights.npz", w=w, b=b)
    np.savez(tmp_path / "x.npz", x=x)
    model = tmp_path / "tiny.tflite"
    built = subprocess.run(
        [sys.executable, "-c", TINY, tmp_path / "weights.npz", model],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]

    # Execute
    done = _arm("python", "-c", PREDICT, model, tmp_path / "x.npz", tmp_path / "y.npy")

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "aarch64"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), x @ w + b, rtol=1e-5, atol=1e-6)


def test_the_client_cli_answers_under_arm(arm64: None) -> None:
    # Execute
    done = _arm("client", "--help")

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: fedprune-client")


def test_the_edge_unit_tests_pass_under_arm(arm64: None) -> None:
    # Execute: tests/edge_client, tests/protocol and tests/device_profiles under emulated ARM.
    done = _arm("test", "-q", timeout=1200)

    # Assert
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_a_depthwise_model_unit_pruned_mid_run_trains_on_an_emulated_arm_client(
    arm64: None, mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: the coordinator and one litert client on the host, one litert client under ARM;
    # the MobileNet preset (depthwise convolutions), half its channels gone and rebuilt after
    # round 2
    from fedprune.coordinator import digits

    paths, heldout = digits.write_demo_data(tmp_path / "data", 2, alpha=100.0, seed=0)
    bin_ = Path(sys.executable).parent
    coordinator = subprocess.Popen(
        [
            bin_ / "fedprune-coordinator",
            "--broker",
            mosquitto,
            "--run",
            "arm",
            "--model",
            "mobilenet",
            "--units",
            "l2",
            "--target",
            "0.5",
            "--min-clients",
            "2",
            "--rounds",
            "3",
            "--begin-round",
            "1",
            "--end-round",
            "2",
            "--heldout",
            heldout,
            "--out",
            tmp_path / "runs",
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    host = subprocess.Popen(
        [
            bin_ / "fedprune-client",
            "--broker",
            mosquitto,
            "--run",
            "arm",
            "--id",
            "host",
            "--data",
            paths[0],
            "--profile",
            "raspberry-pi-4",
            "--models",
            tmp_path / "host",
            "--cache",
            tmp_path / "host-cache",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    # Execute
    arm = _arm(
        "client",
        "--broker",
        mosquitto,
        "--run",
        "arm",
        "--id",
        "pi",
        "--data",
        paths[1],
        "--profile",
        "raspberry-pi-4",
        "--models",
        tmp_path / "pi",
        "--cache",
        tmp_path / "cache",
        timeout=900,
    )
    out, err = coordinator.communicate(timeout=300)
    host.wait(timeout=120)

    # Assert: every round had both clients, the last one on the rebuilt model; the ARM one
    # trained without TensorFlow and installed the model deployed to its profile.
    assert arm.returncode == 0, arm.stdout[-2000:] + arm.stderr[-2000:]
    assert coordinator.returncode == 0, err[-3000:]
    rounds = [json.loads(line) for line in (tmp_path / "runs" / "arm" / "metrics.jsonl").open()]
    assert [r["reported"] for r in rounds] == [2, 2, 2]
    assert all(r["rejected"] == {} for r in rounds)
    parameters = [r["parameters"] for r in rounds]
    assert parameters[0] == 11_370 and parameters[1] == parameters[2] < 11_370 / 2
    log = arm.stdout + arm.stderr
    assert "TensorFlow loaded: no" in log
    assert (tmp_path / "pi" / "raspberry-pi-4" / "model.tflite").is_file()
