"""``fedprune-report``: plots and one HTML page from a run directory.

It reads only files (config.toml, metrics.jsonl, devices.json, export/*/export.json) and writes
``report/`` inside the run directory: PNG plots made with matplotlib (accuracy and loss, sparsity,
bytes per round against dense float32, per-device participation) and ``index.html`` with the
configuration, a summary, the exports per profile and the plots. No TensorFlow is loaded.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from fedprune import __version__
from fedprune.protocol.errors import ConfigError, FedpruneError, print_error

PROG = "fedprune-report"


BARS = 60
"""Up to this many devices, one group of bars each; beyond, a histogram of participation."""

NEEDED = (
    "round",
    "sparsity",
    "bytes_up",
    "bytes_down",
    "dense_bytes_up",
    "dense_bytes_down",
    "seconds",
)
"""What every line of metrics.jsonl must hold for the report (fedprune 0.1 wrote them all)."""


@dataclass(frozen=True, kw_only=True)
class Run:
    """What a run directory holds, read and checked."""

    path: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    exports: dict[str, dict[str, Any]]  # by profile

    @classmethod
    def read(cls, path: Path) -> Run:
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise ConfigError(f"{path}: not a run directory (no metrics.jsonl)")
        try:
            rounds = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            config = tomllib.loads((path / "config.toml").read_text())
            devices_file = path / "devices.json"
            devices = (
                json.loads(devices_file.read_text())["devices"] if devices_file.exists() else []
            )
            for device in devices:  # every row has these, or the file is unreadable
                _ = [device[key] for key in ("id", "selected", "reported", "late", "rejected")]
            exports = {
                meta.parent.name: json.loads(meta.read_text())
                for meta in sorted((path / "export").glob("*/export.json"))
            }
        except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable run file ({exc})") from exc
        if not rounds:
            raise ConfigError(f"{path}: metrics.jsonl has no rounds yet")
        for line, row in enumerate(rounds, 1):
            missing = [k for k in NEEDED if not isinstance(row, dict) or k not in row]
            if missing:
                raise ConfigError(f"{metrics}:{line}: no {', '.join(missing)}")
        return cls(path=path, config=config, rounds=rounds, devices=devices, exports=exports)


def plots(run: Run, out: Path) -> list[tuple[str, str]]:
    """Write the PNG plots into ``out``; (file name, caption) of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in run.rounds]
    made: list[tuple[str, str]] = []

    def save(fig: Any, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, caption))

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    auc = any(r.get("auc") is not None for r in run.rounds)  # an autoencoder's score
    scores = (
        ("auc", "held-out AUC (coordinator)") if auc else ("accuracy", "held-out (coordinator)")
    )
    for key, label in (scores, ("client_accuracy", "devices")):
        acc.plot(rounds, [r.get(key) for r in run.rounds], marker=".", label=label)
    metric = "AUC" if auc else "accuracy"
    acc.set(xlabel="round", ylabel=metric, ylim=(0, 1), title=metric.capitalize())
    acc.legend()
    for key, label in (("loss", "held-out (coordinator)"), ("client_loss", "devices")):
        loss.plot(rounds, [r.get(key) for r in run.rounds], marker=".", label=label)
    loss.set(xlabel="round", ylabel="loss", title="Loss")
    loss.legend()
    save(fig, "accuracy.png", "Accuracy and loss per round")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(rounds, [r["sparsity"] for r in run.rounds], marker=".", color="tab:green")
    target = run.config.get("schedule", {}).get("target")
    if target is not None:
        ax.axhline(target, linestyle="--", color="grey", label=f"target {target:g}")
        ax.legend()
    ax.set(xlabel="round", ylabel="share of weights pruned", ylim=(0, 1), title="Sparsity")
    save(fig, "sparsity.png", "Sparsity of the global model after each round")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    kib = 1 / 1024
    series = (
        ("bytes_up", "uplink sent", "-"),
        ("dense_bytes_up", "uplink dense", "--"),
        ("bytes_down", "downlink sent", "-"),
        ("dense_bytes_down", "downlink dense", "--"),
    )
    for key, label, style in series:
        ax.plot(rounds, [r[key] * kib for r in run.rounds], style, marker=".", label=label)
    ax.set(xlabel="round", ylabel="KiB", title="Bytes per round against dense float32")
    ax.set_ylim(bottom=0)
    ax.legend()
    save(fig, "bytes.png", "Bytes on the wire per round, sent against dense float32")

    if run.devices and len(run.devices) <= BARS:
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(run.devices) + 2), 3.6))
        ids = [str(d["id"]) for d in run.devices]
        width = 0.2
        for i, key in enumerate(("selected", "reported", "late", "rejected")):
            xs = [j + (i - 1.5) * width for j in range(len(ids))]
            ax.bar(xs, [d[key] for d in run.devices], width, label=key)
        ax.set_xticks(range(len(ids)), ids, rotation=30, ha="right")
        for tick in ax.get_xticklabels():
            tick.set_parse_math(False)  # a device's id is text, never math ("$")
        ax.set(ylabel="rounds", title="Participation per device")
        ax.legend()
        save(
            fig,
            "participation.png",
            "Rounds each device was selected for, reported, was late or was rejected",
        )
    elif run.devices:  # too many for a bar each: how many devices reported how much
        fig, ax = plt.subplots(figsize=(7, 3.6))
        shares = [d["reported"] / d["selected"] for d in run.devices if d["selected"]]
        ax.hist(shares, bins=20, range=(0, 1))
        title = f"Participation of {len(run.devices):,} devices"
        ax.set(
            xlabel="share of the rounds it was selected for that it reported",
            ylabel="devices",
            title=title,
        )
        save(fig, "participation.png", "How many devices reported which share of their rounds")
    return made


PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedprune report: $run</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { border-bottom: 1px solid #d8dde6; padding: 4px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0 24px; } img { max-width: 100%; }
</style></head><body>
<h1>fedprune report: $run</h1>
<p>From <code>$path</code>, made by $prog $version.</p>
<h2>Summary</h2>$summary
<h2>Exports per device profile</h2>$exports
<h2>Plots</h2>$plots
<h2>Configuration</h2>$config
</body></html>
""")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        return f"<td{' class=num' if numeric else ''}>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _score(export: dict[str, Any], side: str) -> Any:
    """An export's accuracy on ``side`` (``tflite``, ``keras``), or an autoencoder's AUC."""
    accuracy = export.get(f"{side}_accuracy")
    return export.get(f"{side}_auc") if accuracy is None else accuracy


def _fmt(value: Any, spec: str) -> Any:
    return "-" if value is None else format(value, spec)


def page(run: Run, made: list[tuple[str, str]]) -> str:
    last = run.rounds[-1]
    sent_up = sum(r["bytes_up"] for r in run.rounds)
    dense_up = sum(r["dense_bytes_up"] for r in run.rounds)
    sent_down = sum(r["bytes_down"] for r in run.rounds)
    dense_down = sum(r["dense_bytes_down"] for r in run.rounds)
    summary = _table(
        ["figure", "value"],
        [
            ["rounds", len(run.rounds)],
            ["final held-out accuracy", _fmt(last.get("accuracy"), ".4f")],
            *([["final held-out AUC", _fmt(last["auc"], ".4f")]] if last.get("auc") else []),
            [
                "final held-out recall per class",
                ", ".join(f"{c}: {r:.2f}" for c, r in enumerate(last.get("recall") or [])) or "-",
            ],
            ["final sparsity", _fmt(last["sparsity"], ".4f")],
            [
                "parameters (first round / last)",
                f"{run.rounds[0].get('parameters', 0):,} / {last.get('parameters', 0):,}",
            ],
            ["devices", len(run.devices)],
            ["uplink (sent / dense float32)", f"{sent_up:,} / {dense_up:,} bytes"],
            ["downlink (sent / dense float32)", f"{sent_down:,} / {dense_down:,} bytes"],
            ["updates rejected", sum(sum(r.get("rejected", {}).values()) for r in run.rounds)],
            ["wall time of the rounds", f"{sum(r['seconds'] for r in run.rounds):.1f} s"],
        ],
    )
    exports = (
        _table(
            [
                "profile",
                "precision",
                "tflite bytes",
                "gzip bytes",
                "LiteRT accuracy (AUC)",
                "Keras accuracy (AUC)",
                "latency p50 ms",
                "latency p95 ms",
                "runtime",
            ],
            [
                [
                    name,
                    e.get("precision"),
                    e.get("tflite_bytes"),
                    e.get("gzip_bytes"),
                    _fmt(_score(e, "tflite"), ".4f"),
                    _fmt(_score(e, "keras"), ".4f"),
                    _fmt(e.get("latency_ms_p50"), ".3f"),
                    _fmt(e.get("latency_ms_p95"), ".3f"),
                    e.get("runtime", ""),
                ]
                for name, e in run.exports.items()
            ],
        )
        if run.exports
        else "<p>No exports in this run directory.</p>"
    )
    figures = "".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in made
    )
    flat = _flatten(run.config)
    config = _table(["setting", "value"], [[k, v] for k, v in flat.items()])
    return PAGE.substitute(
        run=html.escape(run.path.name),
        path=html.escape(str(run.path)),
        prog=PROG,
        version=__version__,
        summary=summary,
        exports=exports,
        plots=figures,
        config=config,
    )


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def write(run_dir: Path) -> Path:
    """Write ``run_dir/report/`` and return its ``index.html``."""
    run = Run.read(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    try:
        made = plots(run, out)
    except (ValueError, TypeError, OverflowError) as exc:  # matplotlib on values it cannot draw
        raise ConfigError(f"{run_dir}: cannot plot this run ({exc})") from exc
    index = out / "index.html"
    index.write_text(page(run, made))
    return index


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write plots (PNG) and one HTML page about a finished or running run from "
        "its run directory, into RUN_DIR/report/.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="e.g. runs/demo-20261203-120000")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        index = write(args.run_dir)
    except (FedpruneError, OSError) as exc:
        return print_error(PROG, exc)
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
