"""``fedprune-export RUN_DIR [--profile NAME_OR_PATH ...] [--all-profiles]``: export per device."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fedprune import __version__
from fedprune.device_profiles import DEFAULT_PROFILE
from fedprune.edge_client.quiet import native_log_filtered
from fedprune.edge_client.terminal import steps
from fedprune.protocol.errors import ExportError, FedpruneError, print_error

if TYPE_CHECKING:
    from fedprune.converters.export import ExportResult
    from fedprune.converters.report import ExportReport
    from fedprune.device_profiles import DeviceProfile

PROG = "fedprune-export"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface, kept separate so it can be documented and tested."""
    parser = _Parser(
        prog=PROG,
        description=(
            "Export a finished run's pruned model (RUN_DIR/model/stripped.keras, or wrapped.keras) "
            "to TFLite for each device profile: the profile's precision (float32, float16, "
            "dynamic_int8, full_int8), TFLite's sparse format when the profile asks for it, it "
            "makes the file smaller and LiteRT's default interpreter (XNNPACK) runs it; checked "
            "in that interpreter against the Keras model on the held-out set. Writes "
            "RUN_DIR/export/PROFILE/model.tflite and export.json. An export over the "
            "profile's max_model_bytes, or losing more than its accuracy_tolerance, is refused and "
            "nothing is written for that profile. Exit status: 0 all exported, 4 some refused, "
            "2 bad input."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="finished run directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--profile",
        dest="profiles",
        action="extend",
        nargs="+",
        metavar="NAME_OR_PATH",
        help=f"shipped profile name or path to a profile .toml; several allowed "
        f"(default: {DEFAULT_PROFILE}; see fedprune-profiles list)",
    )
    which.add_argument(
        "--all-profiles", action="store_true", help="export for every shipped profile"
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="NPZ",
        help="held-out .npz with arrays x and y (default: RUN_DIR/heldout.npz)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="NPZ",
        help="full_int8 calibration samples: an .npz with x (y optional), up to 200 rows of x "
        "are used, chosen by content; every held-out sample is then scored (default: 20%% of "
        "the distinct held-out rows, chosen by content and left out of the scoring)",
    )
    parser.add_argument(
        "--int8-io",
        action="store_true",
        help="give full_int8 exports int8 input and output instead of float32 (their scale and "
        "zero point are in export.json); other precisions are unaffected",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export for each profile, one line per profile; on bad input one ``error:`` line."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error; the parser has already printed.
        return exc.code if isinstance(exc.code, int) else 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the TensorFlow import
    try:
        with native_log_filtered():
            from fedprune.converters.export import export_profiles
        from fedprune.device_profiles import available

        profiles: list[str] = (
            available() if args.all_profiles else args.profiles or [DEFAULT_PROFILE]
        )
        width = max(len(Path(p).stem) for p in profiles)

        # The int8 calibrator prints to fd 2 on every conversion: filtered; the bar is on stdout.
        with native_log_filtered(), steps(len(profiles), "exporting") as bar:

            def show(profile: DeviceProfile, result: ExportResult) -> None:
                bar.advance(f"{profile.name:<{width}}  {_describe(profile, result)}")

            results = export_profiles(
                args.run_dir,
                profiles,
                args.data,
                args.calibration,
                int8_io=args.int8_io,
                on_result=show,
                on_start=lambda profile: bar.describe(f"exporting {profile.name}"),
            )
    except (FedpruneError, OSError) as error:  # OSError: e.g. an unwritable export folder
        return print_error(PROG, error)
    refused = any(isinstance(result, ExportError) for result in results)
    return ExportError.exit_code if refused else 0


def _describe(profile: DeviceProfile, result: ExportResult) -> str:
    if isinstance(result, ExportError):
        return "refused: " + str(result).removeprefix(f"profile {profile.name}: ")
    variant = (
        result.precision.value
        + ("+sparse" if result.sparse_format else "")
        + ("+int8io" if result.int8_io else "")
    )
    return (
        f"{variant:<19} {result.tflite_bytes:>11,} B  gzip {result.gzip_bytes:>11,} B  "
        f"{result.scores()}  "
        f"latency p50 {result.latency_ms_p50:.3f} ms p95 {result.latency_ms_p95:.3f} ms "
        f"({result.threads} threads)  {_budgets(result)}{result.model_path}"
    )


def _budgets(result: ExportReport) -> str:
    """Which of the profile's budgets the export meets, e.g. ``budgets: latency met, size
    MISSED (41,230 > 32,768 B)``; empty when the profile sets none."""
    if not result.budgets:
        return ""
    units = {"latency_ms": ("latency", "ms", ".3f"), "size_bytes": ("size", "B", ",.0f")}
    parts = []
    for budget in result.budgets:
        what, unit, form = units[budget.name]
        verdict = "met" if budget.met else "MISSED"
        parts.append(f"{what} {verdict} ({budget.measured:{form}} vs {budget.limit:{form}} {unit})")
    return "budgets: " + ", ".join(parts) + "  "


if __name__ == "__main__":
    sys.exit(main())
