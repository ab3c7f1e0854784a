"""Human-readable progress lines and the end-of-run summary."""

from __future__ import annotations

from fedprune.coordinator.result import RoundResult
from fedprune.coordinator.session import Summary


def _kb(n: int) -> str:
    return f"{n / 1024:,.0f} KB"


def round_line(r: RoundResult) -> str:
    score = "  -  " if r.score is None else f"{r.score:.3f}"
    if r.validation is not None:
        score += f" (val {r.validation:.3f})"
    rejected = sum(r.rejected.values())
    line = (
        f"round {r.round:3d}  {r.metric[:3].lower()} {score}  sparsity {r.sparsity:.2f}"
        f"  params {r.parameters:,}"
        f"  clients {r.reported}/{r.selected}"
        f"  up {_kb(r.bytes_up)}/{_kb(r.dense_bytes_up)}"
        f"  down {_kb(r.bytes_down)}/{_kb(r.dense_bytes_down)} (sent/dense f32)  {r.seconds:.1f}s"
    )
    return line + (f"  rejected {rejected}" if rejected else "")


def _traffic(label: str, sent: int, dense: int) -> str:
    saved = f" ({1 - sent / dense:.0%} saved)" if dense else ""
    return f"  {label:<10} {_kb(sent)} sent vs {_kb(dense)} dense float32{saved}"


def summary_lines(summary: Summary, *, seconds: float) -> list[str]:
    results = summary.results
    last = results[-1]
    kept = next((r for r in results if r.round == summary.kept_round), last)
    score = "n/a" if kept.score is None else f"{kept.score:.4f}"
    held_out = "held-out" if kept.validation is None else "test share of held-out"
    lines = [
        "",
        f"done in {seconds:.0f} s: {len(results)} rounds",
        *(
            [f"  kept       round {kept.round} (the best on validation, {kept.validation:.4f})"]
            if kept is not last and kept.validation is not None
            else []
        ),
        f"  {kept.metric:<10} {score} ({held_out}, Keras)   sparsity {kept.sparsity:.4f}"
        f"   parameters {kept.parameters:,}",
        _traffic(
            "uplink", sum(r.bytes_up for r in results), sum(r.dense_bytes_up for r in results)
        ),
        _traffic("downlink", summary.bytes_down, sum(r.dense_bytes_down for r in results)),
        "             (every byte the devices received: models, round and status messages,"
        " artifact, deployment)",
    ]
    for profile, export in summary.exports.items():
        if isinstance(export, str):
            lines.append(f"  {profile}: no export: {export}")
            continue
        sparse = "+sparse" if export.sparse_format else ""
        deployed = "deployed" if profile in summary.deployed else "NOT deployed"
        lines += [
            f"  {profile}: {export.precision}{sparse} tflite {export.tflite_bytes:,} bytes,"
            f" gzip {export.gzip_bytes:,}, {export.scores()}, {deployed}"
            + "".join(
                f", {b.name.split('_')[0]} budget {'met' if b.met else 'MISSED'}"
                for b in export.budgets
            ),
            f"      {export.model_path}",
        ]
    if summary.deployed and summary.not_installed:
        lines.append(
            f"  devices    {', '.join(summary.not_installed)} did not confirm the deployed model"
        )
    lines.append(
        f"  run        {summary.run_dir} (config.toml, metrics.jsonl, devices.json,"
        " model/, export/)"
    )
    if summary.unhealthy is not None:
        lines.append(f"  WARNING    the final model looks broken: {summary.unhealthy}")
    return lines
