"""Convergence on skewed data: each training rule alone and combined, against FedAvg and against
the same model trained centrally.

    .venv/bin/python benchmarks/convergence.py [--models cnn,resnet8] [--alphas 0.05,0.1,0.5]
        [--seeds 0,1,2] [--rounds 30] [--devices 20] [--per-round 10] [--rules fedavg,adam,...]
        [--pruning dense,80] [--results benchmarks/results/convergence.jsonl] [--jobs 2]
        [--report-only] [--plot docs/images/convergence.png]

The real parts of a round run in one process, without MQTT (as in benchmarks/poisoning.py): the
keras trainer trains each selected device as a device does (FedProx's term from the Spec, the
round's learning rate from the schedule, SCAFFOLD's correction by c - c_i and its c_i, the mean
raw gradient of its steps, as edge_client/control.py keeps it), FedAvg combines the updates, the
coordinator's Control takes the devices' control changes, the run's server optimizer takes the
step, the pruner applies TF-MOT's mask
update, and the global model is scored on the test share of the held-out digits (the validation
share only chooses the round ``--keep best`` keeps). Every option comes from ``RunConfig``, so a
rule here is the run a user starts with the same flags.

Digits are split over ``--devices`` devices by Dirichlet(alpha); ``--per-round`` of them train
each round (drawn from the seed). The centralized baseline trains the same model, with the same
optimizer, on the pooled data of all devices for as many epochs as the devices take together:
rounds x per-round / devices x local epochs. Each run is one JSON line in ``--results``; a run
already there is not run again, so a long grid can be stopped and continued, and ``--report-only``
prints the tables (medians over the seeds) from it.

Per run: the rounds to reach 95% of the centralized accuracy (``-``: never), the final accuracy
(for ``--keep best``: the test accuracy of the kept round), and the spread of the last 5 rounds
(max - min of the accuracy of the model the run would deploy had it ended at that round).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

RULES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "momentum": {"server_optimizer": "momentum"},
    "adam": {"server_optimizer": "adam"},
    "yogi": {"server_optimizer": "yogi"},
    "adagrad": {"server_optimizer": "adagrad"},
    "prox": {"prox_mu": 0.1},
    "cosine": {"lr_schedule": "cosine"},
    "scaffold": {"scaffold": True},
    "best": {"keep": "best"},
}
"""Each rule alone (RunConfig options), as a user gives them; combinations are joined with +
(``adam+cosine+best``), and an option's value overrides with = (``adam+server_lr=0.03``)."""

TARGET_SHARE = 0.95  # of the centralized accuracy: the rounds-to-target figure
SPREAD_ROUNDS = 5
PRUNINGS = {"dense": 0.0, "80": 0.8, "units75": 0.75}


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str
    alpha: float
    seed: int
    pruning: str
    rule: str
    rounds: int
    devices: int
    per_round: int
    min_size: int = 20  # samples each device gets at least (digits.dirichlet_split)

    @property
    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def options(rule: str) -> dict[str, Any]:
    """The RunConfig options of a rule or a combination of rules (``a+b``)."""
    out: dict[str, Any] = {}
    if rule == "centralized":  # the baseline trains with the run's own defaults
        return out
    for part in rule.split("+"):
        if "=" in part:  # an option's value, as in a sweep: adam+server_lr=0.03
            name, _, value = part.partition("=")
            out[name] = float(value)
            continue
        if part not in RULES:
            raise SystemExit(f"unknown rule {part!r} (one of {', '.join(RULES)})")
        out.update(RULES[part])
    return out


def config_of(setting: Setting) -> Any:
    from fedprune.coordinator.config import RunConfig, ScheduleConfig

    target = PRUNINGS[setting.pruning]
    schedule = ScheduleConfig(
        target=target,
        begin_round=2,
        end_round=max(3, setting.rounds * 2 // 3),
        units="l2" if setting.pruning.startswith("units") else "",  # type: ignore[arg-type]
    )
    return RunConfig(
        model=setting.model,
        rounds=setting.rounds,
        seed=setting.seed,
        schedule=schedule,
        heldout="heldout.npz",  # a name: --keep best needs one (the data is in memory here)
        **options(setting.rule),
    )


def devices_data(setting: Setting) -> tuple[list[Any], Any]:
    from fedprune.coordinator import digits
    from fedprune.edge_client import data as local_data

    with tempfile.TemporaryDirectory() as tmp:
        paths, heldout = digits.write_demo_data(
            Path(tmp),
            setting.devices,
            alpha=setting.alpha,
            seed=setting.seed,
            min_size=setting.min_size,
        )
        devices = [local_data.load(p, seed=setting.seed + i) for i, p in enumerate(paths)]
        return devices, local_data.load(heldout, holdout=0.0)


def trainer_for(config: Any, pruner: Any) -> Any:
    from fedprune.edge_client.keras_trainer import KerasTrainer
    from fedprune.protocol.messages import Spec

    return KerasTrainer(
        Spec(
            model_json=pruner.stripped.to_json(),
            input_shape=pruner.input_shape(),
            optimizer=config.optimizer,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            local_epochs=config.local_epochs,
            batch_size=config.batch_size,
            prox_mu=config.prox_mu,
            scaffold=config.scaffold,
        )
    )


def run(setting: Setting) -> dict[str, Any]:
    """One federated run: the test accuracy and validation score of every round."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    from fedprune.coordinator import models
    from fedprune.coordinator.aggregation import make_aggregator
    from fedprune.coordinator.keeper import split
    from fedprune.coordinator.pruning import pruner_for
    from fedprune.coordinator.scaffold import Control
    from fedprune.coordinator.session import evaluator
    from fedprune.protocol.codec import Update

    started = time.perf_counter()
    config = config_of(setting)
    devices, heldout = devices_data(setting)
    pruner = pruner_for(models.build(config.model, seed=setting.seed), config.schedule)
    shape = pruner.input_shape()
    x_all, _ = heldout.shaped(shape)
    (x_val, y_val), (x_test, y_test) = split(x_all, heldout.y, config.validation, config.seed)
    test, validate = evaluator(pruner, x_test, y_test), evaluator(pruner, x_val, y_val)
    trainer = trainer_for(config, pruner)
    server = config.server()
    control = Control(multiple=config.clip_multiple) if config.scaffold else None
    own: dict[int, list[np.ndarray]] = {}  # SCAFFOLD: each device's c_i
    pick = np.random.default_rng([setting.seed, 77])
    accuracy, validation = [], []
    for round_ in range(1, config.rounds + 1):
        model = pruner.model()
        aggregator = make_aggregator("fedavg", [w.shape for w in model.weights])
        aggregator.control = control
        c = None
        if control is not None:
            control.payload(model)  # c for this round (what devices fetch)
            c = [a.astype(np.float32) for a in control.c]
        chosen = pick.choice(setting.devices, setting.per_round, replace=False)
        for i in sorted(chosen):
            x, _ = devices[i].shaped(shape)
            c_i = own.get(int(i))
            if c is not None and (c_i is None or [a.shape for a in c_i] != [a.shape for a in c]):
                c_i = [np.zeros_like(a) for a in c]  # new, or the model was rebuilt
            new = trainer.fit(
                model,
                x,
                devices[i].y,
                epochs=config.local_epochs,
                seed=setting.seed * 100_003 + round_ * 101 + int(i),
                learning_rate=config.learning_rate_of(round_),
                correction=None
                if c is None or c_i is None
                else _masked([a - b for a, b in zip(c, c_i, strict=True)], model),
            )
            change = None
            if c_i is not None:
                fresh = _masked(trainer.mean_gradient(), model)
                change = [a - b for a, b in zip(fresh, c_i, strict=True)]
                own[int(i)] = fresh
            deltas = [n - w for n, w in zip(new, model.weights, strict=True)]
            aggregator.add(
                Update(
                    round=round_,
                    num_samples=devices[i].num_samples,
                    deltas=deltas,
                    control=change,
                )
            )
        delta = aggregator.delta(model.weights)
        assert delta is not None
        pruner.set_weights(server.step(model, delta))
        if control is not None:
            control.close(model, setting.devices)
        pruner.step(round_)
        if pruner.rebuild_due(round_) and pruner.rebuild():  # as the round loop does
            server.cut(pruner.cut)
            if control is not None:
                control.reset()  # as each device's c_i (other shapes now)
            trainer = trainer_for(config, pruner)
        evaluation, chosen_by = test(), validate()
        assert evaluation is not None and chosen_by is not None
        accuracy.append(_finite(evaluation.accuracy))
        validation.append(_finite(chosen_by.accuracy))
    return {
        "setting": dataclasses.asdict(setting),
        "accuracy": accuracy,
        "validation": validation,
        "at_target": config.schedule.at_target,
        "keep": config.keep.value,
        "sparsity": pruner.sparsity(),
        "parameters": pruner.parameters(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def centralized(setting: Setting) -> dict[str, Any]:
    """The same model trained on the pooled data for the devices' epochs in total."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    from fedprune.coordinator import models
    from fedprune.coordinator.keeper import split
    from fedprune.coordinator.pruning import pruner_for
    from fedprune.protocol.codec import Model

    config = config_of(setting)
    devices, heldout = devices_data(setting)
    pruner = pruner_for(
        models.build(config.model, seed=setting.seed), dataclasses.replace(config.schedule)
    )
    shape = pruner.input_shape()
    x = np.concatenate([d.shaped(shape)[0] for d in devices])
    y = np.concatenate([d.y for d in devices])
    epochs = round(config.rounds * setting.per_round / setting.devices * config.local_epochs)
    trainer = trainer_for(config, pruner)
    start = Model(
        weights=pruner.stripped.get_weights(), masks=[None] * len(pruner.stripped.weights)
    )
    new = trainer.fit(start, x, y, epochs=epochs, seed=setting.seed)
    x_all, _ = heldout.shaped(shape)
    _, (x_test, y_test) = split(x_all, heldout.y, config.validation, config.seed)
    evaluation = trainer.evaluate(new, x_test, y_test)
    return {"setting": dataclasses.asdict(setting), "accuracy": [_finite(evaluation.accuracy)]}


def _masked(arrays: list[np.ndarray], model: Any) -> list[np.ndarray]:
    """``arrays`` zero where ``model`` is pruned, as a device keeps SCAFFOLD's variates."""
    return [
        np.asarray(a, np.float32) * (1 if m is None else m)
        for a, m in zip(arrays, model.masks, strict=True)
    ]


def _finite(value: float | None) -> float:
    return 0.0 if value is None or not math.isfinite(value) else round(float(value), 4)


# --- the figures ---------------------------------------------------------------------------------


def deployed(result: dict[str, Any]) -> list[float]:
    """Per round, the test accuracy of the model the run would deploy had it ended there: that
    round's, or with --keep best the best on validation among the eligible rounds so far."""
    accuracy, validation = result["accuracy"], result["validation"]
    if result["keep"] != "best":
        return list(accuracy)
    out, best = [], None
    for i, score in enumerate(validation):
        if i + 1 >= result["at_target"] and (best is None or score > validation[best]):
            best = i
        out.append(accuracy[best] if best is not None else accuracy[i])
    return out


def figures(result: dict[str, Any], central: float) -> dict[str, float | None]:
    shown = deployed(result)
    target = TARGET_SHARE * central
    reached = next((i + 1 for i, a in enumerate(result["accuracy"]) if a >= target), None)
    tail = shown[-SPREAD_ROUNDS:]
    return {"rounds": reached, "final": shown[-1], "spread": max(tail) - min(tail)}


def read(path: Path) -> Iterator[dict[str, Any]]:
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)


def key(setting: dict[str, Any]) -> str:
    """A run's setting as text (runs of before --min-size had 20)."""
    return json.dumps({"min_size": 20, **setting}, sort_keys=True)


def unique(path: Path) -> list[dict[str, Any]]:
    """The runs in ``path``, the first of each setting (two grids may both have run one)."""
    first: dict[str, dict[str, Any]] = {}
    for r in read(path):
        first.setdefault(key(r["setting"]), r)
    return list(first.values())


def report(path: Path) -> None:
    results = unique(path)
    central = {
        (r["setting"]["model"], r["setting"]["alpha"], r["setting"]["seed"]): r["accuracy"][0]
        for r in results
        if r["setting"]["rule"] == "centralized"
    }
    groups: dict[tuple[str, float, str, str], list[dict[str, float | None]]] = {}
    for r in results:
        s = r["setting"]
        if s["rule"] == "centralized" or (s["model"], s["alpha"], s["seed"]) not in central:
            continue
        key = (s["model"], s["alpha"], s["pruning"], s["rule"])
        groups.setdefault(key, []).append(figures(r, central[s["model"], s["alpha"], s["seed"]]))
    for model in sorted({k[0] for k in groups}):
        for alpha in sorted({k[1] for k in groups if k[0] == model}):
            base = [v for (m, a, s), v in central.items() if m == model and a == alpha]
            print(
                f"\n#### {model}, alpha {alpha:g}: centralized {statistics.median(base):.3f}"
                f" (median of {len(base)} seeds)\n"
            )
            print("| pruning | rule | rounds to 95% | final accuracy | vs centralized | spread |")
            print("|---|---|---|---|---|---|")
            for (m, a, pruning, rule), rows in sorted(groups.items()):
                if (m, a) != (model, alpha):
                    continue
                final = statistics.median(float(r["final"] or 0.0) for r in rows)
                spread = statistics.median(float(r["spread"] or 0.0) for r in rows)
                reached = [r["rounds"] for r in rows]
                rounds = (
                    "-"
                    if sum(x is None for x in reached) > len(rows) / 2
                    else f"{statistics.median(math.inf if x is None else x for x in reached):g}"
                )
                print(
                    f"| {pruning} | {rule} | {rounds} | {final:.3f}"
                    f" | {100 * (final - statistics.median(base)):+.1f}"
                    f" | {100 * spread:.1f} ({len(rows)} seeds) |"
                )


PLOTTED = ("fedavg", "momentum", "yogi", "scaffold", "momentum+best", "scaffold+best")
"""The rules the plot shows, each in its one colour in every panel."""


def plot(path: Path, out: Path) -> None:
    """Accuracy over rounds of the model a run would export, median over seeds, one panel per
    model and alpha (dense runs of the rules in ``PLOTTED``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in unique(path) if r["setting"]["pruning"] == "dense"]
    panels = sorted(
        {(r["setting"]["model"], r["setting"]["alpha"]) for r in results},
        key=lambda p: (p[0] != "cnn", p),
    )
    columns = 3
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    colours = dict(zip(PLOTTED, plt.get_cmap("tab10").colors, strict=False))
    for ax, (model, alpha) in zip(axes.flat, panels, strict=False):
        for rule in PLOTTED:
            curves = [
                deployed(r)
                for r in results
                if (r["setting"]["model"], r["setting"]["alpha"], r["setting"]["rule"])
                == (model, alpha, rule)
            ]
            if curves:
                rounds = np.arange(1, len(curves[0]) + 1)
                median = np.median(np.array(curves), axis=0)
                ax.plot(rounds, median, label=rule, color=colours[rule], linewidth=1.2)
        ax.set_title(f"{model}, alpha {alpha:g}", fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.set_ylim(0.6, 1.0)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def _work(setting: Setting) -> dict[str, Any]:
    return centralized(setting) if setting.rule == "centralized" else run(setting)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn,resnet8")
    p.add_argument("--alphas", default="0.05,0.1,0.5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument(
        "--min-size",
        type=int,
        default=20,
        help="samples each device gets at least (20 devices at alpha 0.05 need 10)",
    )
    p.add_argument("--rules", default="fedavg,momentum,adam,yogi,adagrad,prox,cosine")
    p.add_argument("--pruning", default="dense,80", help=f"of {', '.join(PRUNINGS)}")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/convergence.jsonl"))
    p.add_argument("--jobs", type=int, default=2, help="processes (each one thread)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--plot", type=Path, help="write the accuracy curves here (PNG)")
    args = p.parse_args()
    if not args.report_only:
        done = {key(r["setting"]) for r in read(args.results)}
        todo = []
        for model in args.models.split(","):
            for alpha in (float(a) for a in args.alphas.split(",")):
                for seed in (int(s) for s in args.seeds.split(",")):
                    base = dict(
                        model=model,
                        alpha=alpha,
                        seed=seed,
                        rounds=args.rounds,
                        devices=args.devices,
                        per_round=args.per_round,
                        min_size=args.min_size,
                    )
                    todo.append(Setting(pruning="dense", rule="centralized", **base))  # type: ignore[arg-type]
                    for pruning in args.pruning.split(","):
                        for rule in args.rules.split(","):
                            options(rule)  # an unknown rule fails before any work
                            todo.append(Setting(pruning=pruning, rule=rule, **base))  # type: ignore[arg-type]
        todo = [s for s in todo if s.key not in done]
        print(f"{len(todo)} runs to do", file=sys.stderr, flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_work, setting) for setting in todo]
            for setting, future in zip(todo, futures, strict=True):
                try:
                    result = future.result()
                except Exception as exc:  # one setting that cannot run: said, and the rest go on
                    print(f"{setting}: {exc}", file=sys.stderr, flush=True)
                    continue
                with args.results.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
                final = result["accuracy"][-1]
                print(
                    f"{setting.model} a={setting.alpha:g} s={setting.seed} {setting.pruning}"
                    f" {setting.rule}: {final:.3f} ({result.get('seconds', 0)} s)",
                    file=sys.stderr,
                    flush=True,
                )
    report(args.results)
    if args.plot:
        plot(args.results, args.plot)


if __name__ == "__main__":
    main()
