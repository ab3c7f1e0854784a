"""Human-readable progress lines and the end-of-run summary."""

from __future__ import annotations

from coordinator.rounds import RoundResult
from coordinator.session import Summary


def _kb(n: int) -> str:
    return f"{n / 1024:,.0f} KB"


def round_line(r: RoundResult) -> str:
    acc = "  -  " if r.accuracy is None else f"{r.accuracy:.3f}"
    rejected = sum(r.rejected.values())
    up = f"{_kb(r.bytes_up)}/{_kb(r.dense_bytes_up)}"
    down = f"{_kb(r.bytes_down)}/{_kb(r.dense_bytes_down)}"
    line = (
        f"round {r.round:3d}  acc {acc}  sparsity {r.sparsity:.2f}  clients {r.reported}/{r.selected}"
        f"  up {up}  down {down} (sent/dense f32)  {r.seconds:.1f}s"
    )
    return line + (f"  rejected {rejected}" if rejected else "")


def summary_lines(summary: Summary, *, seconds: float) -> list[str]:
    results = summary.results
    last = results[-1]
    up = sum(r.bytes_up for r in results)
    dense_up = sum(r.dense_bytes_up for r in results)
    down = sum(r.bytes_down for r in results)
    dense_down = sum(r.dense_bytes_down for r in results)
    acc = "n/a" if last.accuracy is None else f"{last.accuracy:.4f}"
    lines = [
        "",
        f"done in {seconds:.0f} s: {len(results)} rounds",
        f"  accuracy   {acc} (held-out, Keras)   sparsity {last.sparsity:.4f}",
        f"  uplink     {_kb(up)} sent vs {_kb(dense_up)} dense float32 ({1 - up / dense_up:.0%} saved)"
        if dense_up else "  uplink     nothing received",
        f"  downlink   {_kb(down)} sent vs {_kb(dense_down)} dense float32"
        f" ({1 - down / dense_down:.0%} saved)",
    ]
    export = summary.export
    if export is not None:
        lines += [
            f"  tflite     {export.tflite_bytes:,} bytes, gzip {export.gzip_bytes:,} bytes,"
            f" LiteRT accuracy {export.tflite_accuracy:.4f} (Keras {export.keras_accuracy:.4f})",
            f"  model      {export.model_path}",
        ]
    lines.append(f"  run        {summary.run_dir} (config.toml, metrics.jsonl, model/, export/)")
    return lines
