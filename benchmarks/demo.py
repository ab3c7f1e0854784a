"""Benchmark the demo end to end: wall time, accuracy, sparsity, bytes on the wire, TFLite size.

    .venv/bin/python benchmarks/demo.py --repeats 3 [--broker mosquitto|amqtt] [-- extra demo flags]

Runs ``fedprune-demo`` ``--repeats`` times as a subprocess (a fresh process each time, as a user
would), reads each run directory, and prints one Markdown table with the median of every column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from processes import demo as demo_command  # the test suite's commands


def one_run(out: Path, broker: str, extra: list[str]) -> dict[str, float]:
    run = f"bench-{time.time_ns()}"
    started = time.perf_counter()
    subprocess.run(
        demo_command(broker, *extra, out=out, run=run),
        check=True,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    run_dir = out / run
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    export = json.loads((run_dir / "export" / "generic-x86-64" / "export.json").read_text())
    up, dense_up = sum(r["bytes_up"] for r in rounds), sum(r["dense_bytes_up"] for r in rounds)
    down = sum(r["bytes_down"] for r in rounds)
    dense_down = sum(r["dense_bytes_down"] for r in rounds)
    return {
        "wall s": seconds,
        "rounds s": sum(r["seconds"] for r in rounds),
        "accuracy": rounds[-1]["accuracy"],
        "sparsity": rounds[-1]["sparsity"],
        "uplink / dense": up / dense_up,
        "downlink / dense": down / dense_down,
        "last-round uplink / dense": rounds[-1]["bytes_up"] / rounds[-1]["dense_bytes_up"],
        "tflite bytes": export["tflite_bytes"],
        "tflite gzip bytes": export["gzip_bytes"],
        "LiteRT accuracy": export["tflite_accuracy"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--broker", default="auto")
    p.add_argument("extra", nargs="*", help="flags passed to fedprune-demo (after --)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_run(Path(tmp), args.broker, args.extra) for _ in range(args.repeats)]
    print(f"median of {args.repeats} run(s), broker {args.broker}, flags {args.extra or 'none'}\n")
    print("| measure | median | min | max |\n|---|---|---|---|")
    for key in runs[0]:
        values = [r[key] for r in runs]
        fmt = "{:,.0f}" if "bytes" in key else "{:.3f}"
        print(
            f"| {key} | {fmt.format(statistics.median(values))} | {fmt.format(min(values))}"
            f" | {fmt.format(max(values))} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
