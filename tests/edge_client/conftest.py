"""Fixtures for the edge client's unit tests (no broker, no TensorFlow)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedprune.edge_client import trainer
from fedprune.edge_client.data import LocalData
from fedprune.protocol.codec import Model

# Two real TFLite digits classifiers, built once per session in a subprocess, so that the edge
# client's tests never import TensorFlow themselves.
N_TEST = 450

BUILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    import tensorflow as tf
    import tf_keras
    from sklearn.datasets import load_digits

    out, n_test = Path(sys.argv[1]), int(sys.argv[2])
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:-n_test], order[-n_test:]
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([
        tf_keras.layers.Input((64,)),
        tf_keras.layers.Dense(32, activation="relu"),
        tf_keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(tf_keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x[train], y[train], epochs=3, batch_size=32, verbose=0)
    serve = tf.function(
        lambda t: model(t, training=False),
        input_signature=[tf.TensorSpec([None, 64], tf.float32, name="input")],
    )
    for name, optimizations in (("float32", []), ("int8", [tf.lite.Optimize.DEFAULT])):
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [serve.get_concrete_function()], model
        )
        converter.optimizations = optimizations
        (out / name).mkdir()
        (out / name / "model.tflite").write_bytes(converter.convert())
    np.savez(out / "digits.npz", x=x[test], y=y[test].astype(np.int64))
    """
)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with float32/model.tflite, int8/model.tflite and digits.npz (held-out x, y)."""
    prebuilt = os.environ.get("FEDPRUNE_TEST_MODELS")  # built on the host for the ARM run
    if prebuilt:
        return Path(prebuilt)
    root = tmp_path_factory.mktemp("tflite-models")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", BUILD, str(root), str(N_TEST)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


# The client tests' trainer and their model and data (tests/support/client_harness.py).
@pytest.fixture(autouse=True)
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(trainer.BACKENDS, "fake", "client_harness:AddOneTrainer")


@pytest.fixture
def model() -> Model:
    """A 20x30 kernel with 40% of it pruned and an unpruned bias; values are multiples of 0.5 so
    that ``w + 1 - w`` is exactly 1.0 in float32."""
    rng = np.random.default_rng(11)
    mask = (rng.random((20, 30)) > 0.4).astype(np.float32)
    kernel = (rng.integers(-8, 8, size=(20, 30)) * 0.5).astype(np.float32) * mask
    bias = (rng.integers(-8, 8, size=30) * 0.5).astype(np.float32)
    return Model(weights=[kernel, bias], masks=[mask, None])


@pytest.fixture
def data() -> LocalData:
    rng = np.random.default_rng(5)
    return LocalData(
        x=rng.normal(size=(24, 4)).astype(np.float32),
        y=rng.integers(0, 3, size=24),
        x_test=rng.normal(size=(6, 4)).astype(np.float32),
        y_test=rng.integers(0, 3, size=6),
    )
