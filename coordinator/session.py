"""One whole coordinator run: build and wrap the model, serve the rounds, save, export, deploy."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import recall_score

from fedprune.converters.export import ExportReport, export_profiles, resolve_profile
from fedprune.converters.task import task_of
from fedprune.coordinator import models
from fedprune.coordinator.aggregation import Loss
from fedprune.coordinator.config import Keep, RunConfig
from fedprune.coordinator.health import chance, verdict
from fedprune.coordinator.keeper import Best, split
from fedprune.coordinator.keys import DeviceKeys
from fedprune.coordinator.observer import Observer
from fedprune.coordinator.parts import Parts
from fedprune.coordinator.pruning import Pruner, pruner_for
from fedprune.coordinator.result import RoundResult
from fedprune.coordinator.rounds import Coordinator
from fedprune.coordinator.rundir import RunDir
from fedprune.coordinator.validation import Limits
from fedprune.edge_client import data as local_data
from fedprune.edge_client.quiet import native_log_filtered
from fedprune.edge_client.task import Evaluation, Task
from fedprune.protocol.envelope import encode
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import COORDINATOR, Offline, Snapshot
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

log = logging.getLogger("fedprune.coordinator")


@dataclass(frozen=True, kw_only=True)
class Summary:
    run_dir: Path
    results: list[RoundResult]
    exports: dict[str, ExportReport | str]  # by profile: the report, or why there is none
    deployed: list[str]  # the profiles whose export was published to their devices
    unhealthy: str | None = None  # why the final model is not fit to deploy (coordinator.health)
    not_installed: list[str] = dataclasses.field(default_factory=list)  # devices that did not
    # confirm the deployed model within the install wait
    bytes_down: int = 0  # everything the devices received, the deployment after the rounds too
    kept_round: int | None = None  # the round whose model was exported (--keep)


def evaluator(
    pruner: Pruner, x: np.ndarray | None, y: np.ndarray | None, task: Task = Task.CLASSIFY
) -> Callable[[], Evaluation | None]:
    """The global model's loss and score on the held-out set (with each class's recall for a
    classifier, the AUC on its anomaly labels for a reconstruction); ``None`` without one."""

    def evaluate() -> Evaluation | None:
        if x is None or y is None:
            return None
        outputs = pruner.stripped(x, training=False).numpy()
        evaluation = task.evaluate(outputs, x, y, anomalies=True)
        if task is not Task.CLASSIFY:
            return evaluation
        recall = recall_score(
            y,
            np.argmax(outputs, axis=1),
            labels=range(outputs.shape[1]),
            average=None,
            zero_division=0.0,
        )
        return dataclasses.replace(evaluation, recall=[round(float(r), 4) for r in recall])

    return evaluate


def _score(evaluate: Callable[[], Evaluation | None]) -> Callable[[], float | None]:
    """The score (accuracy, or AUC) of what ``evaluate`` measures."""

    def score() -> float | None:
        evaluation = evaluate()
        return None if evaluation is None else evaluation.score

    return score


def held_out_loss(
    pruner: Pruner, x: np.ndarray | None, y: np.ndarray | None, task: Task = Task.CLASSIFY
) -> Loss | None:
    """The held-out loss of the global model with given weights (the screened rule's measure);
    it leaves the model at those weights."""
    if x is None or y is None:
        return None

    def loss(weights: list[np.ndarray]) -> float:
        pruner.set_weights(weights)
        return task.evaluate(pruner.stripped(x, training=False).numpy(), x, y).loss

    return loss


def task(config: RunConfig) -> Task:
    """What the run's model learns (``--task``, or read from the model's output)."""
    return task_of(models.build(config.model, seed=config.seed), config.task)


def run(
    config: RunConfig,
    *,
    on_round: Callable[[RoundResult], None] | None = None,
    observers: list[Observer] | None = None,
    listeners: list[Callable[[Snapshot], None]] | None = None,
    resume: bool = False,
) -> Summary:
    """Serve the run to its end. ``observers`` hear the round loop's events (Prometheus metrics);
    ``listeners`` get each snapshot monitors get (the coordinator's own dashboard). ``resume``
    continues the run in ``config.run_dir`` from its last checkpoint (with a new session, which
    devices join by themselves)."""
    broker = config.broker_settings()  # a bad TLS, credentials or key file fails before the work
    signer, trust = config.signatures()
    keys = DeviceKeys(config.device_keys) if config.device_keys else None
    model = models.build(config.model, seed=config.seed)
    task = task_of(model, config.task)
    config = dataclasses.replace(config, task=task.value)  # a resumed run keeps what it learns
    pruner = pruner_for(model, config.schedule)
    rundir = RunDir(config.run_dir, overwrite=config.overwrite, resume=resume)
    rundir.write_config(config)
    x, y, choose = _heldout(config, pruner, rundir)
    best_file = rundir.path / "checkpoints" / "best.npz"
    best = None if choose is None else Best(best_file, config.schedule.at_target)
    validate = None if choose is None else _score(evaluator(pruner, *choose, task))

    def after_round(result: RoundResult) -> None:
        if best is not None:
            best.saw(result, pruner)  # before the round's checkpoint: a resume keeps it
        rundir.append(result)
        rundir.write_round_report(coordinator.last_round)
        rundir.checkpoint(
            result.round, pruner, coordinator.telemetry.ledger, coordinator.states()
        )  # the commit point
        rundir.write_devices(coordinator.telemetry.ledger)
        if on_round is not None:
            on_round(result)

    topics = Topics(config.run)
    will = encode(Offline(who=COORDINATOR), run=config.run, sender=COORDINATOR, signer=signer)
    transport = MqttTransport(
        broker,
        client_id=f"fedprune-coordinator-{config.run}",
        will=(topics.status, will),
        max_payload=config.max_payload,
        persistent=True,  # what devices send while we are away waits on the broker
    )
    parts = Parts.build(
        transport,
        config,
        pruner,
        limits=Limits.for_model(pruner.model(), config),
        build_artifact=lambda: _trainable(pruner, config),
        signer=signer,
        trust=trust,
        keys=keys,
        observers=observers,
    )
    coordinator = Coordinator(
        parts,
        pruner,
        evaluate=evaluator(pruner, x, y, task),
        loss=held_out_loss(pruner, *(choose or (x, y)), task),  # it chooses: not the test share
        validate=validate,
        on_round=after_round,
    )
    coordinator.telemetry.listeners.extend(listeners or [])
    if resume:
        coordinator.resume(
            rundir.restore(pruner, coordinator.telemetry.ledger, coordinator.states())
        )
        if best is not None:
            best.resume(len(coordinator.results))
    restore_hangup = _reload_keys_on_hangup(keys)
    try:
        results = coordinator.train()
        kept = best.load_into(pruner) if best is not None else 0
        judged = results[:kept] if kept else results  # the model exported is the kept round's
        if pruner.rebuild():  # unit pruning: what is exported is the smaller model
            log.info(
                "the model is rebuilt without its removed units: %d parameters",
                pruner.parameters(),
            )
        rundir.save_models(pruner)
        unhealthy = verdict(
            judged,
            None if y is None else chance(task, y),
            class_drop=config.class_drop,
            support=() if y is None or task is not Task.CLASSIFY else np.bincount(y).tolist(),
        )
        wanted = sorted({config.profile, *coordinator.profiles.values()})
        coordinator.telemetry.stage("exporting")
        exports = _export(rundir.path, wanted) if x is not None else {}
        deployable, not_installed = _deploy(coordinator, config, exports, unhealthy)
        coordinator.finish(deployed=sorted(deployable))
        rundir.write_devices(coordinator.telemetry.ledger)
        rundir.write_summary(
            bytes_down=coordinator.bytes_down,
            deployed=sorted(deployable),
            not_installed=not_installed,
            unhealthy=unhealthy,
            recall=judged[-1].recall if judged else None,  # the exported model's, per class
            kept_round=judged[-1].round if judged else None,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            coordinator.abort()
        raise
    finally:
        restore_hangup()
        transport.close()
    return Summary(
        run_dir=rundir.path,
        results=results,
        exports=exports,
        deployed=sorted(deployable),
        unhealthy=unhealthy,
        not_installed=not_installed,
        bytes_down=coordinator.bytes_down,
        kept_round=judged[-1].round if judged else None,
    )


def _reload_keys_on_hangup(keys: DeviceKeys | None) -> Callable[[], None]:
    """SIGHUP reads the devices' keys again (``kill -HUP``, ``systemctl reload``); what puts the
    previous handler back. Only the main thread may set one (tests run sessions in others)."""
    if keys is None or threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: keys.request())

    def restore() -> None:
        signal.signal(signal.SIGHUP, previous)

    return restore


def _heldout(
    config: RunConfig, pruner: Pruner, rundir: RunDir
) -> tuple[np.ndarray | None, np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """The run's held-out set (``--heldout``) shaped for the model, ``None`` twice without one;
    with ``--keep best`` its test share, and the validation share that chooses the round (else
    ``None``). The run directory keeps what reports the figures and verifies the exports,
    heldout.npz, never what chose (validation.npz)."""
    if not config.heldout:
        return None, None, None
    heldout = local_data.load(Path(config.heldout), holdout=0.0)
    x, _ = heldout.shaped(pruner.input_shape())
    y = heldout.y
    classes = int(pruner.stripped.output_shape[-1])
    if config.task == Task.CLASSIFY and (y.min() < 0 or y.max() >= classes):
        raise ConfigError(
            f"{config.heldout}: labels run from {y.min()} to {y.max()}; the model has"
            f" {classes} classes"
        )
    choose = None
    validation = rundir.path / "validation.npz"
    if config.keep is Keep.BEST and _own_copy(config, rundir) and validation.is_file():
        kept = local_data.load(validation, holdout=0.0)  # a resumed run's, split already
        choose = kept.shaped(pruner.input_shape())[0], kept.y
    elif config.keep is Keep.BEST:
        choose, (x, y) = split(x, y, config.validation, config.seed)
        rundir.write_heldout(*choose, name=validation.name)
    rundir.write_heldout(x, y)
    return x, y, choose


def _own_copy(config: RunConfig, rundir: RunDir) -> bool:
    """Whether ``--heldout`` is the run directory's heldout.npz (what a resumed run reads)."""
    return Path(config.heldout).resolve() == (rundir.path / "heldout.npz").resolve()


def _deploy(
    coordinator: Coordinator,
    config: RunConfig,
    exports: dict[str, ExportReport | str],
    unhealthy: str | None,
) -> tuple[dict[str, ExportReport], list[str]]:
    """Publish each device profile's export (not a final model that looks broken, unless
    ``--deploy-anyway``) and give the devices ``--install-wait`` seconds to install it: the
    exports deployed, by the profile devices announced, and the devices that did not confirm."""
    deployable = {  # by the profile each device announced
        announced: report
        for announced, exported in coordinator.profiles.items()
        if isinstance(report := exports.get(exported), ExportReport)
    }
    if unhealthy is not None:
        log.error(
            "the final model looks broken: %s; %s",
            unhealthy,
            "deploying it anyway (--deploy-anyway)"
            if config.deploy_anyway
            else "its exports are not deployed (--deploy-anyway deploys them)",
        )
        if not config.deploy_anyway:
            deployable = {}
    if deployable:
        coordinator.telemetry.stage("deploying")
    shas = {
        profile: coordinator.deployments.publish(
            profile,
            report.model_path.read_bytes(),
            precision=str(report.precision),
            accuracy=report.tflite_score,
            export_json=(report.model_path.parent / "export.json").read_text(),
        )
        for profile, report in deployable.items()
    }
    not_installed = (
        coordinator.deployments.await_installs(shas, timeout=config.install_wait) if shas else []
    )
    if not_installed:
        log.warning(
            "%d device(s) did not confirm the deployed model within %.0f s: %s",
            len(not_installed),
            config.install_wait,
            ", ".join(not_installed),
        )
    return deployable, not_installed


def _trainable(pruner: Pruner, config: RunConfig) -> bytes:
    """The training artifact for ``litert`` clients (converters.trainable; built on demand)."""
    from fedprune.converters.trainable import build_trainable

    with native_log_filtered():
        return build_trainable(
            pruner.stripped,
            batch_size=config.batch_size,
            optimizer=config.optimizer,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            task=Task(config.task),
            prox_mu=config.prox_mu,
            scaffold=config.scaffold,
        )


def _export(run_dir: Path, names: list[str]) -> dict[str, ExportReport | str]:
    """Export for each profile; an unknown profile or a refused export is its one-line reason."""
    exports: dict[str, ExportReport | str] = {}
    known = []
    for name in names:
        try:
            known.append(resolve_profile(name))
        except ConfigError as exc:  # e.g. a device's own profile file the coordinator lacks
            exports[name] = str(exc)
    with native_log_filtered():
        results = export_profiles(run_dir, known)
    for profile, result in zip(known, results, strict=True):
        exports[profile.name] = result if isinstance(result, ExportReport) else str(result)
    for name, reason in exports.items():
        if isinstance(reason, str):
            log.warning("no export for %s: %s", name, reason)
    return exports
