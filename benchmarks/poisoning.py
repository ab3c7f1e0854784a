"""Poisoned devices against each aggregation rule: final accuracy, as a Markdown table.

    .venv/bin/python benchmarks/poisoning.py [--rounds 20] [--seed 0] [--clip-norm 5]

Digits split over 10 devices (Dirichlet alpha 0.5), the CNN preset, TF-MOT pruning to 80% as in
the demo. The real parts of a round run in one process, without MQTT: the keras trainer trains
each device, updates are encoded with the wire codec and checked by the coordinator's
``validate`` (with each device's hello as the cap on its sample count), the aggregation rule
combines them, the pruner applies TF-MOT's mask update, and the global model is scored on the
held-out set. Two of the 10 devices are poisoned in one of three ways:

    sign-flip   send the negative of their honest delta
    scale-100   send 100 times their honest delta (inside the default norm limit of 1e4)
    claim-10x   send the negative delta, and claim (in hello and update) 10x their samples

Every rule sees the same devices, data, seeds and rounds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from fedprune.coordinator import digits, models  # noqa: E402
from fedprune.coordinator.aggregation import make_aggregator  # noqa: E402
from fedprune.coordinator.config import ScheduleConfig  # noqa: E402
from fedprune.coordinator.pruning import pruner_for  # noqa: E402
from fedprune.coordinator.validation import Limits, Rejected, validate  # noqa: E402
from fedprune.edge_client import data as local_data  # noqa: E402
from fedprune.edge_client.keras_trainer import KerasTrainer  # noqa: E402
from fedprune.protocol.codec import Update, encode_update  # noqa: E402
from fedprune.protocol.messages import Spec  # noqa: E402

DEVICES, POISONED = 10, (0, 1)
ATTACKS = ("none", "sign-flip", "scale-100", "claim-10x")


def run(
    attack: str, rule: str, *, rounds: int, seed: int, clip_norm: float, folder: Path
) -> dict[str, float]:
    paths, heldout_path = digits.write_demo_data(folder, DEVICES, alpha=0.5, seed=seed)
    devices = [local_data.load(p, seed=seed + i) for i, p in enumerate(paths)]
    heldout = local_data.load(heldout_path, holdout=0.0)
    model = models.build("cnn", seed=seed)
    schedule = ScheduleConfig(target=0.8, begin_round=2, end_round=max(3, rounds - 4))
    pruner = pruner_for(model, schedule)
    pruner.step(0)
    shape = [int(d) for d in pruner.stripped.input_shape[1:]]
    spec = Spec(
        model_json=pruner.stripped.to_json(),
        input_shape=shape,
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        local_epochs=2,
        batch_size=32,
    )
    trainer = KerasTrainer(spec)
    claimed = [
        d.num_samples * (10 if attack == "claim-10x" and i in POISONED else 1)
        for i, d in enumerate(devices)
    ]
    x_test, _ = heldout.shaped(shape)
    rejected = norms = 0.0
    for round_ in range(1, rounds + 1):
        global_model = pruner.model()
        aggregator = make_aggregator(
            rule.split("+")[0],
            [w.shape for w in global_model.weights],
            clip_norm=clip_norm if rule.endswith("+clip") else 0.0,
            trim=0.2,
        )
        for i, device in enumerate(devices):
            x, _ = device.shaped(shape)
            new = trainer.fit(
                global_model, x, device.y, epochs=2, seed=seed * 1000 + round_ * 10 + i
            )
            deltas = [n - w for n, w in zip(new, global_model.weights, strict=True)]
            if i in POISONED and attack != "none":
                factor = 100.0 if attack == "scale-100" else -1.0
                deltas = [factor * d for d in deltas]
            update = Update(round=round_, num_samples=claimed[i], deltas=deltas)
            payload = encode_update(update, global_model.masks)
            limits = Limits(max_samples=claimed[i])  # the hello's declaration caps the claim
            try:
                checked = validate(payload, global_model, round_=round_, limits=limits)
            except Rejected:
                rejected += 1
                continue
            if i not in POISONED:
                norms += float(
                    np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in deltas))
                )
            aggregator.add(checked)
        pruner.set_weights(aggregator.apply(global_model.weights))
        pruner.step(round_)
    probs = pruner.stripped(x_test, training=False).numpy()
    return {
        "accuracy": float(np.mean(np.argmax(probs, axis=1) == heldout.y)),
        "sparsity": pruner.sparsity(),
        "rejected": rejected,
        "honest_norm": norms / (rounds * (DEVICES - len(POISONED))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-norm", type=float, default=5.0)
    args = p.parse_args()
    rules = ["fedavg", "fedavg+clip", "median", "trimmed-mean", "trimmed-mean+clip"]
    results: dict[tuple[str, str], dict[str, float]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for attack in ATTACKS:
            for rule in rules:
                results[attack, rule] = run(
                    attack,
                    rule,
                    rounds=args.rounds,
                    seed=args.seed,
                    clip_norm=args.clip_norm,
                    folder=Path(tmp),
                )
                print(f"# {attack:10s} {rule:13s} {results[attack, rule]}", flush=True)
    print(
        f"\n{DEVICES} devices, {len(POISONED)} poisoned, {args.rounds} rounds, seed {args.seed},"
        f" clip norm {args.clip_norm:g}, {time.perf_counter() - started:.0f} s\n"
    )
    print("| attack | " + " | ".join(rules) + " |")
    print("|---|" + "---|" * len(rules))
    for attack in ATTACKS:
        cells = [f"{results[attack, rule]['accuracy']:.3f}" for rule in rules]
        print(f"| {attack} | " + " | ".join(cells) + " |")
    clean = {rule: results["none", rule]["accuracy"] for rule in rules}
    print("\npoints below the same rule's clean run:")
    for attack in ATTACKS[1:]:
        drops = [f"{100 * (clean[r] - results[attack, r]['accuracy']):+.1f}" for r in rules]
        print(f"| {attack} | " + " | ".join(drops) + " |")


if __name__ == "__main__":
    main()
