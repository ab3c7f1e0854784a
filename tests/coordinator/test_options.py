"""The run's options come from one description (coordinator.config's fields): every option is a
flag, a config.toml key that reads back what a run wrote, and the aggregator's shared options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedprune.coordinator import aggregator, cli, demo
from fedprune.coordinator.aggregation import Rule
from fedprune.coordinator.config import (
    Downlink,
    RunConfig,
    ScheduleConfig,
    ScheduleKind,
    UnitNorm,
)
from fedprune.coordinator.options import COORDINATOR_ONLY, config_from
from fedprune.coordinator.rundir import RunDir

BROKER = {"broker", "ca", "cert", "key", "credentials"}

EVERY_OPTION_CHANGED = RunConfig(
    run="garden",
    broker="mqtts://broker.example:8883",
    ca="ca.pem",
    cert="coordinator.pem",
    key="coordinator.key",
    credentials="broker.toml",
    signing_key="coordinator.sign",
    device_keys="device-keys",
    model="mlp",
    task="classify",
    rounds=30,
    min_clients=4,
    clients_per_round=8,
    quorum=0.75,
    round_timeout=90.0,
    join_timeout=300.0,
    local_epochs=3,
    batch_size=16,
    optimizer="adam",
    learning_rate=0.01,
    momentum=0.5,
    lr_schedule="cosine",
    lr_decay=0.9,
    prox_mu=0.01,
    scaffold=True,
    server_optimizer="yogi",
    server_lr=0.03,
    server_momentum=0.8,
    server_beta1=0.8,
    server_beta2=0.95,
    server_tau=0.01,
    keep="best",
    validation=0.3,
    schedule=ScheduleConfig(
        kind=ScheduleKind.CONSTANT,
        target=0.5,
        begin_round=3,
        end_round=20,
        units=UnitNorm.L2,
        rebuild_every=2,
        weight_target=0.3,
        weight_end_round=9,
    ),
    max_payload=65536,
    heldout="heldout.npz",
    out="elsewhere",
    profile="raspberry-pi-4",
    seed=7,
    deploy_anyway=True,
    class_drop=0.2,
    install_wait=30.0,
    aggregation=Rule.FEDAVG,
    clip_norm=5.0,
    clip_multiple=2.0,
    weight_cap=2.0,
    staleness_weight=0.5,
    trim=0.2,
    max_update_bytes=1_000_000,
    max_norm=100.0,
    max_samples=5000,
    max_pending_bytes=2**20,
    aggregators=0,
    codec="int8+top0.1",
    downlink=Downlink.CODEC,
)
"""Every option away from its default, except the three a valid run cannot change together:
``overwrite`` (never read back), ``structure`` (not with ``units``) and ``aggregators`` and
``aggregation`` (aggregators need plain fedavg, without ``staleness_weight``)."""

UNCHANGED = {"overwrite", "structure", "aggregators", "aggregation"}


def _fields(record: type) -> list[str]:
    return [f.name for f in dataclasses.fields(record)]


def test_the_example_changes_every_option_it_can() -> None:
    # A new option must be added to EVERY_OPTION_CHANGED, so that the tests below cover it
    default, schedule = RunConfig(), ScheduleConfig()
    changed = {
        name
        for name in _fields(RunConfig)
        if getattr(EVERY_OPTION_CHANGED, name) != getattr(default, name)
    } | {
        name
        for name in _fields(ScheduleConfig)
        if getattr(EVERY_OPTION_CHANGED.schedule, name) != getattr(schedule, name)
    }

    assert changed | UNCHANGED == set(_fields(RunConfig)) | set(_fields(ScheduleConfig))


def test_every_option_is_a_coordinator_flag_named_after_its_field() -> None:
    dests = {a.dest for a in cli.parser()._actions}
    demo_dests = {a.dest for a in demo.parser()._actions}

    options = (set(_fields(RunConfig)) - {"schedule"}) | set(_fields(ScheduleConfig))
    assert options <= dests
    assert options - BROKER - set(COORDINATOR_ONLY) <= demo_dests


def test_a_run_config_written_with_every_option_changed_reads_back_the_same(
    tmp_path: Path,
) -> None:
    RunDir(tmp_path / "garden").write_config(EVERY_OPTION_CHANGED)

    args = cli.parse(["--config", str(tmp_path / "garden" / "config.toml")])

    assert config_from(args) == EVERY_OPTION_CHANGED


def test_flags_set_every_option_as_the_config_file_does(tmp_path: Path) -> None:
    config = EVERY_OPTION_CHANGED
    s = config.schedule
    argv = [
        *("--run", config.run, "--broker", config.broker, "--ca", config.ca),
        *("--cert", config.cert, "--key", config.key, "--credentials", config.credentials),
        *("--signing-key", config.signing_key, "--device-keys", config.device_keys),
        *("--model", config.model, "--task", "classify", "--rounds", "30"),
        *("--min-clients", "4"),
        *("--clients-per-round", "8", "--quorum", "0.75", "--round-timeout", "90"),
        *("--join-timeout", "300", "--local-epochs", "3", "--batch-size", "16"),
        *("--optimizer", "adam", "--lr", "0.01", "--momentum", "0.5"),
        *("--schedule", "constant", "--target", "0.5", "--begin-round", "3"),
        *("--end-round", "20", "--units", "l2", "--rebuild-every", "2"),
        *("--weight-target", "0.3", "--weight-end-round", str(s.weight_end_round)),
        *("--max-payload", "65536", "--heldout", config.heldout, "--out", config.out),
        *("--profile", config.profile, "--seed", "7", "--deploy-anyway"),
        *("--install-wait", "30", "--clip-norm", "5", "--staleness-weight", "0.5"),
        *("--class-drop", "0.2", "--weight-cap", "2", "--clip-multiple", "2"),
        *("--trim", "0.2", "--max-update-bytes", "1000000", "--max-norm", "100"),
        *("--max-samples", "5000", "--max-pending-bytes", str(2**20)),
        *("--codec", config.codec, "--downlink", "codec"),
        *("--lr-schedule", "cosine", "--lr-decay", "0.9", "--prox-mu", "0.01"),
        *("--server-optimizer", "yogi", "--server-lr", "0.03", "--server-momentum", "0.8"),
        *("--server-beta1", "0.8", "--server-beta2", "0.95", "--server-tau", "0.01"),
        *("--keep", "best", "--validation", "0.3", "--scaffold"),
    ]

    assert config_from(cli.parse(argv)) == config


def test_an_aggregator_takes_the_options_it_shares_with_its_coordinator() -> None:
    argv = ["--run", "garden", "--max-payload", "65536", "--weight-cap", "2"]
    argv += ["--signing-key", "c.sign", "--device-keys", "keys", "--id", "agg-1"]

    config = config_from(aggregator.parser().parse_args(argv))

    assert config == RunConfig(
        run="garden",
        max_payload=65536,
        weight_cap=2.0,
        signing_key="c.sign",
        device_keys="keys",
    )
    dests = {a.dest for a in aggregator.parser()._actions}
    assert "rounds" not in dests and "lr" not in dests  # only what it shares
