"""``fedprune-export RUN_DIR [--profile NAME] [--data NPZ]``: export a run's model to TFLite."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from converters.quiet import native_log_filtered
from edge_client.errors import FedpruneError

PROG = "fedprune-export"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface, kept separate so it can be documented and tested."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Convert a run's pruned tf_keras model (RUN_DIR/model/stripped.keras, or "
            "wrapped.keras) to float32 TFLite, check its accuracy under LiteRT against Keras "
            "on the held-out set, and write RUN_DIR/export/PROFILE/model.tflite and export.json."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="finished run directory")
    parser.add_argument(
        "--profile",
        default="generic-x86-64",
        metavar="NAME",
        help="device profile the export is for (recorded; default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="NPZ",
        help="held-out .npz with arrays x and y (default: RUN_DIR/heldout.npz)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the export and print a summary; on failure one ``error:`` line and its exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error; argparse has already printed.
        return exc.code if isinstance(exc.code, int) else 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the TensorFlow import
    try:
        with native_log_filtered():
            from converters.export import export_run

        report = export_run(args.run_dir, profile=args.profile, data=args.data)
    except FedpruneError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"wrote {report.model_path}")
    print(
        f"  size   {report.tflite_bytes:,} bytes, gzip {report.gzip_bytes:,} bytes "
        f"({report.weight_sparsity:.0%} of kernel weights zero)"
    )
    print(
        f"  accuracy on {report.n_eval} held-out samples: keras {report.keras_accuracy:.4f}, "
        f"tflite {report.tflite_accuracy:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
