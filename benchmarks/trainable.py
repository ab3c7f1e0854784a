"""Benchmark the trainable TFLite artifact: size, build time and one training step in LiteRT.

    .venv/bin/python benchmarks/trainable.py [--steps 200]

For each preset and optimizer: the artifact's raw and gzip size, the time to build (convert and
check) it, and the median time of a batch-32 ``train`` step in ai-edge-litert with the default
XNNPACK delegate and with builtin kernels only. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: E402

from fedprune.converters.trainable import build_trainable  # noqa: E402
from fedprune.coordinator import models  # noqa: E402

BATCH = 32


def step_inputs(train: Any) -> tuple[np.ndarray, np.ndarray]:
    """A batch for a training artifact's ``train`` signature: random ``x`` and, as its ``y``
    asks, integer labels (a classifier) or float32 targets (a reconstruction: ``x`` itself)."""
    details = train.get_input_details()
    rng = np.random.default_rng(0)
    x = rng.random(details["x"]["shape"], dtype=np.float32)
    if details["y"]["dtype"] != np.float32:
        return x, rng.integers(0, 10, x.shape[0]).astype(np.int64)
    return x, x.reshape(details["y"]["shape"])


def step_ms(artifact: bytes, resolver: OpResolverType, steps: int) -> float:
    """The median ``train`` step (ms) of a training artifact, after 10 untimed steps."""
    interpreter = Interpreter(model_content=artifact, experimental_op_resolver_type=resolver)
    train = interpreter.get_signature_runner("train")
    x, y = step_inputs(train)
    times = []
    for i in range(steps + 10):
        start = time.perf_counter()
        train(x=x, y=y)
        if i >= 10:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    print(
        "| preset, optimizer | .tflite bytes | gzip bytes | build + check s |"
        " train step ms (XNNPACK) | train step ms (builtin kernels) |"
    )
    print("|---|---|---|---|---|---|")
    for preset, optimizer in (("mlp", "sgd"), ("cnn", "sgd"), ("cnn", "adam")):
        model = models.build(preset)
        start = time.perf_counter()
        artifact = build_trainable(
            model, batch_size=BATCH, optimizer=optimizer, learning_rate=0.05, momentum=0.9
        )
        built = time.perf_counter() - start
        xnnpack = step_ms(artifact, OpResolverType.AUTO, args.steps)
        builtin = step_ms(artifact, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, args.steps)
        print(
            f"| {preset}, {optimizer} | {len(artifact):,} |"
            f" {len(gzip.compress(artifact, 9, mtime=0)):,} | {built:.1f} | {xnnpack:.3f} |"
            f" {builtin:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
