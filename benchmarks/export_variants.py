"""Export every TFLite variant of a dense and two pruned models; print a Markdown table.

    .venv/bin/python benchmarks/export_variants.py              # makes 3 demo runs first (~45 s)
    .venv/bin/python benchmarks/export_variants.py RUN_DIR ...  # uses finished run directories

Without run directories it runs ``fedprune-demo`` three times (``--target`` 0.0, 0.80
and 0.90; at 0.0 the polynomial schedule keeps every weight). Each model is exported with
``converters.export_model`` for every precision, with and without the sparse format, through a
profile built here (one thread, no size limit, tolerance 1.0 so nothing is refused); each export is
verified under LiteRT on the run's held-out set. The goals of issue 3 are checked after the table,
and the constant tensors of the smallest file of the sparsest model are broken down: raw, gzip -9
alone, and the zero-order entropy of its zero positions and non-zero values.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedprune.converters.export import export_model, load_run_model  # noqa: E402
from fedprune.converters.report import ExportReport  # noqa: E402
from fedprune.device_profiles import Arch, DeviceProfile, Precision, Trainer  # noqa: E402
from fedprune.edge_client import data as npz_data  # noqa: E402
from fedprune.edge_client.litert import load_interpreter  # noqa: E402
from fedprune.edge_client.quiet import native_log_filtered  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from processes import demo  # the test suite's commands

TARGETS = {"dense": "0.0", "p80": "0.8", "p90": "0.9"}
FLOATS = (Precision.FLOAT32, Precision.FLOAT16)


@dataclass(frozen=True)
class Row:
    model: str
    sparse_asked: bool
    report: ExportReport


def make_runs(out: Path) -> list[Path]:
    """Run the demo once per target sparsity; the run directories."""
    runs = []
    for name, target in TARGETS.items():
        print(f"demo run {name} (target {target}) ...", file=sys.stderr, flush=True)
        command = demo("auto", out=out, run=name, target=target)
        subprocess.run(command, check=True, capture_output=True)
        runs.append(out / name)
    return runs


def variant_profile(precision: Precision, sparse: bool) -> DeviceProfile:
    """A profile that asks for one variant and refuses nothing."""
    return DeviceProfile(
        name=f"bench-{precision.value}{'-sparse' if sparse else ''}",
        description="benchmark variant",
        arch=Arch.X86_64,
        memory_mb=16384,
        cores=1,
        precision=precision,
        sparse_format=sparse,
        max_model_bytes=2**40,
        max_payload_bytes=1 << 20,
        uplink_kbps=100_000,
        trainer=Trainer.KERAS,
        local_epochs=1,
        batch_size=32,
        accuracy_tolerance=1.0,
    )


def export_variants(run_dir: Path, out: Path) -> list[Row]:
    """Every precision, without and with the sparse format, of one run's model."""
    model = load_run_model(run_dir)
    heldout = npz_data.load(run_dir / "heldout.npz", holdout=0.0)
    rows: list[Row] = []
    label = ""
    for precision in Precision:
        for sparse in (False, True):
            profile = variant_profile(precision, sparse)
            with native_log_filtered():
                report = export_model(
                    model,
                    profile,
                    x=heldout.x,
                    y=heldout.y,
                    out_dir=out / run_dir.name / profile.name,
                    source=run_dir,
                    data=run_dir / "heldout.npz",
                )
            sparsity = report.weight_sparsity
            label = label or ("dense" if sparsity < 0.01 else f"{sparsity:.0%} pruned")
            rows.append(Row(label, sparse, report))
            print(f"  {label}: {profile.name} done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row], baseline_gzip: int) -> list[str]:
    lines = [
        "| model | variant | file kept | raw bytes | gzip bytes | LiteRT acc | Keras acc "
        "| p50 ms (1 thread) | dense f32 gzip / gzip |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = row.report
        variant = r.precision.value + (" + sparse" if row.sparse_asked else "")
        if not row.sparse_asked:
            kept = "dense format"
        elif r.sparse_format:
            kept = f"sparse (dense {r.dense_format_bytes:,})"
        else:
            kept = f"dense (sparse {r.sparse_format_bytes:,})"
        lines.append(
            f"| {row.model} | {variant} | {kept} | {r.tflite_bytes:,} | {r.gzip_bytes:,} "
            f"| {r.tflite_accuracy:.4f} | {r.keras_accuracy:.4f} | {r.latency_ms_p50:.4f} "
            f"| {baseline_gzip / r.gzip_bytes:.1f}x |"
        )
    return lines


def goals(rows: list[Row]) -> list[str]:
    """Issue 3's goals, each with the figures that decide it."""
    base = _baseline(rows)
    baseline, dense_acc = base.gzip_bytes, base.keras_accuracy
    pruned = [r for r in rows if r.model != "dense"]
    quantized = [r for r in pruned if r.report.precision is not Precision.FLOAT32]
    best = min(quantized, key=lambda r: r.report.gzip_bytes)
    ratio = baseline / best.report.gzip_bytes
    ok = ratio >= 10 and best.report.tflite_accuracy >= dense_acc - 0.01
    worst = max(
        (r for r in rows if r.report.precision in FLOATS),
        key=lambda r: abs(r.report.tflite_accuracy - r.report.keras_accuracy),
    )
    drift = abs(worst.report.tflite_accuracy - worst.report.keras_accuracy)
    sparsest = max(r.report.weight_sparsity for r in rows)
    top = min(
        (r for r in rows if r.report.weight_sparsity == sparsest),
        key=lambda r: r.report.gzip_bytes,
    )
    top_ratio = baseline / top.report.gzip_bytes
    return [
        f"- dense float32 .tflite gzip: {baseline:,} B, dense Keras accuracy {dense_acc:.4f}",
        f"- best pruned + quantized: {best.model} {best.report.precision.value}"
        f"{' sparse-format' if best.report.sparse_format else ''}, {best.report.gzip_bytes:,} B "
        f"gzip = {ratio:.1f}x smaller, LiteRT accuracy {best.report.tflite_accuracy:.4f} "
        f"({(best.report.tflite_accuracy - dense_acc) * 100:+.2f} points): "
        f"{'MET' if ok else 'NOT MET'} (>= 10x, within 1 point)",
        f"- float variants in LiteRT vs their Keras model: largest gap {drift * 100:.2f} points "
        f"({worst.model} {worst.report.precision.value}): "
        f"{'MET' if drift <= 0.005 else 'NOT MET'} (<= 0.5 point)",
        f"- stretch, 20x at {sparsest:.0%}: {top_ratio:.1f}x ({top.report.precision.value}"
        f"{' sparse-format' if top.report.sparse_format else ''}, {top.report.gzip_bytes:,} B): "
        f"{'MET' if top_ratio >= 20 else 'NOT MET'}",
    ]


def breakdown(report: ExportReport) -> list[str]:
    """The constant tensors of ``report``'s file: raw, gzip alone, zero-order entropy."""
    interpreter = load_interpreter(report.model_path)
    interpreter.allocate_tensors()
    lines = [
        f"constant tensors of {report.model_path.parent.name} ({report.tflite_bytes:,} B, "
        f"gzip {report.gzip_bytes:,} B), 1 KB and up:",
        "",
        "| tensor | shape | dtype | raw bytes | gzip alone | non-zero | entropy: positions "
        "+ values = bytes |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    listed = 0
    for detail in interpreter.get_tensor_details():
        if detail["name"] == "" or len(detail["shape_signature"]) == 0:
            continue
        try:
            values = interpreter.get_tensor(detail["index"])
        except ValueError:
            continue
        if values.nbytes < 1024 or detail["shape_signature"][0] == -1:  # skip activations
            continue
        listed += values.nbytes
        share = float(np.count_nonzero(values)) / values.size
        positions = values.size * _binary_entropy(share) / 8
        nonzero = values[values != 0]
        _, counts = np.unique(nonzero, return_counts=True)
        p = counts / counts.sum()
        value_bytes = float(nonzero.size * -(p * np.log2(p)).sum() / 8)
        lines.append(
            f"| {detail['name'][:40]} | {list(values.shape)} | {values.dtype} | {values.nbytes:,} "
            f"| {len(gzip.compress(values.tobytes(), 9)):,} | {share:.3f} "
            f"| {positions:,.0f} + {value_bytes:,.0f} = {positions + value_bytes:,.0f} |"
        )
    rest = report.tflite_bytes - listed
    lines.append(f"| everything else (graph, names, small tensors, scales) | | | {rest:,} | | | |")
    return lines


def _baseline(rows: list[Row]) -> ExportReport:
    """The dense model's float32 export without the sparse format."""
    return next(
        r.report
        for r in rows
        if r.model == "dense" and r.report.precision is Precision.FLOAT32 and not r.sparse_asked
    )


def _binary_entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="finished runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="export-variants-") as tmp:
        runs = args.runs or make_runs(Path(tmp) / "runs")
        rows = [row for run in runs for row in export_variants(run, Path(tmp) / "exports")]
        if not any(r.model == "dense" for r in rows):
            print("error: no dense run among the run directories", file=sys.stderr)
            return 2
        print("\n".join(table(rows, _baseline(rows).gzip_bytes)))
        print()
        print("\n".join(goals(rows)))
        print()
        sparsest = max(r.report.weight_sparsity for r in rows)
        smallest = min(
            (r for r in rows if r.report.weight_sparsity == sparsest),
            key=lambda r: r.report.gzip_bytes,
        )
        print("\n".join(breakdown(smallest.report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
