"""A round's local training on a device: the trainer for the run's Spec, the device's own data and
epochs, and the update it makes, in the device's codec.

The trainer is made anew only when what it trains changes (a new Spec or training artifact), not
for a round's learning rate (the coordinator's schedule), which each ``fit`` is given. A profile
bounds the work (its local epochs and batch size where they are smaller than the run's).
A lossy codec adds to each update what earlier ones did not send (error feedback) and keeps what
this one does not, in a residual that survives a restart when the device has a cache folder. A
SCAFFOLD run (``Spec.scaffold``) corrects the steps by the round's control variate and the
device's own, which it keeps there too (edge_client/control.py).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedprune.edge_client.control import ControlVariate, RoundControl, control_key
from fedprune.edge_client.data import LocalData
from fedprune.edge_client.task import Evaluation, Task
from fedprune.edge_client.trainer import (
    EpochHook,
    Trainer,
    backend_class,
    make_trainer,
)
from fedprune.protocol.codec import (
    F32,
    Codec,
    Model,
    Residual,
    Update,
    decode_update,
    default_codec,
    encode_update,
    features,
)
from fedprune.protocol.errors import ConfigError, WireError
from fedprune.protocol.messages import Manifest, Round, Spec

if TYPE_CHECKING:
    from fedprune.device_profiles import DeviceProfile

log = logging.getLogger("fedprune.client")

EPOCH_REPORT_SECONDS = 10.0  # how often a long local training says how far it is


@dataclass(frozen=True, kw_only=True)
class Trained:
    """What a round's training made: the update, its payload in the device's codec, and what
    the log says of it."""

    update: Update
    payload: bytes
    epochs: int
    evaluation: Evaluation


class LocalTraining:
    """Trains a round's model on ``data`` with the ``backend`` trainer. ``local_epochs``
    overrides the run's; ``residual_file`` keeps a lossy codec's residual, ``control_file``
    SCAFFOLD's control variate of this device in run ``run``; ``show`` hears how far training
    is."""

    def __init__(
        self,
        backend: str,
        data: LocalData,
        *,
        profile: DeviceProfile | None = None,
        local_epochs: int | None = None,
        seed: int = 0,
        residual_file: Path | None = None,
        run: str = "",
        control_file: Path | None = None,
        show: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.backend = backend
        self.needs_artifact = backend_class(backend).needs_artifact
        self.data = data
        self.profile = profile
        self.local_epochs = local_epochs
        self.seed = seed
        self.show = show
        self.residual_file = residual_file
        self.residual = Residual() if residual_file is None else Residual.load(residual_file)
        self.run = run
        self.control = ControlVariate(control_file)
        self._trainer: Trainer | None = None
        self._trainer_key: tuple[Spec, Manifest | None] | None = None

    def cannot_train(self, spec: Spec, run: str) -> str | None:
        """Why this device cannot train run ``run`` of ``spec``: its trainer's artifact could
        not be built, or its updates' codec is not installed here; ``None`` when it can."""
        if spec.artifact_error is not None and self.needs_artifact:
            return (
                f"this device's trainer ({self.backend}) cannot train run {run!r}:"
                f" {spec.artifact_error}"
            )
        if not spec.codec:
            return None
        try:
            missing = Codec.parse(spec.codec).features() - set(features())
        except ValueError as exc:
            return f"run {run!r} sends updates in a codec unknown here: {exc}"
        if missing:
            return (
                f"run {run!r} sends updates as {spec.codec}, which needs"
                f" {', '.join(sorted(missing))} (pip install 'fedprune[edge,zstd]')"
            )
        return None

    def codec(self, spec: Spec) -> Codec:
        """How this device sends its updates: the run's codec, else its profile's default."""
        if spec.codec:
            return Codec.parse(spec.codec)
        return F32 if self.profile is None else default_codec(self.profile.uplink_kbps)

    def train(
        self,
        round_: Round,
        spec: Spec,
        model: Model,
        artifact: bytes | None,
        session: str,
        control: Model | None = None,
    ) -> Trained:
        """Train ``round_`` from ``model``; ``ConfigError`` when this device cannot (its labels
        do not fit a classifier, its trainer is not installed). A reconstruction learns the
        samples themselves: its labels play no part. A SCAFFOLD run's round comes with its
        ``control`` variate c (``WireError`` without it)."""
        scaffold = None
        if spec.scaffold:
            if control is None:
                raise WireError(f"round {round_.round} of a SCAFFOLD run came without its control")
            scaffold = RoundControl.begin(control_key(self.run, spec), self.control, control, model)
        trainer = self._trainer_for(spec, artifact)
        x, x_test = self.data.shaped(spec.input_shape)
        classes = model.weights[-1].shape[-1]  # the output layer's bias
        labels = np.concatenate([self.data.y, self.data.y_test])
        if trainer.task is Task.CLASSIFY and (labels.min() < 0 or labels.max() >= classes):
            raise ConfigError(
                f"local labels run from {labels.min()} to {labels.max()}; the model has"
                f" {classes} classes (0..{classes - 1})"
            )
        started = time.perf_counter()
        epochs = self.local_epochs or min(
            round_.local_epochs,
            round_.local_epochs if self.profile is None else self.profile.local_epochs,
        )
        self.show(
            f"round {round_.round}: training {epochs} epoch(s) on {self.data.num_samples} samples"
        )
        seed = self.seed * 100_003 + round_.round
        hook = self._epoch_hook(round_.round, epochs)
        new = trainer.fit(
            model,
            x,
            self.data.y,
            epochs=epochs,
            seed=seed,
            on_epoch=hook,
            learning_rate=round_.learning_rate or spec.learning_rate,
            correction=None if scaffold is None else scaffold.correction,
        )
        train_seconds = time.perf_counter() - started
        evaluation = (
            trainer.evaluate(new, x_test, self.data.y_test)
            if len(self.data.y_test)
            else Evaluation(loss=0.0, n=0)  # nothing held out: weight 0
        )
        deltas = [np.asarray(n, np.float32) - w for n, w in zip(new, model.weights, strict=True)]
        update = Update(
            round=round_.round,
            num_samples=self.data.num_samples,
            deltas=deltas,
            metrics={
                "loss": evaluation.loss,
                **({} if evaluation.accuracy is None else {"accuracy": evaluation.accuracy}),
                "n_eval": float(evaluation.n),
                "train_seconds": train_seconds,
                "peak_memory_mb": peak_memory_mb(),
                "epochs": float(epochs),
                "batch_size": float(trainer.batch_size),
            },
            control=None if scaffold is None else scaffold.change(trainer.mean_gradient(), model),
        )
        payload, sent = self._encode(update, model, spec, seed, session)
        if scaffold is not None and sent.control is not None:
            self.control.keep(scaffold.key, scaffold.sent(sent.control))
        if self.profile is not None and update.metrics["peak_memory_mb"] > self.profile.memory_mb:
            log.warning(
                "round %d: peak memory %.0f MB is over profile %s's %d MB",
                round_.round,
                update.metrics["peak_memory_mb"],
                self.profile.name,
                self.profile.memory_mb,
            )
        return Trained(update=update, payload=payload, epochs=epochs, evaluation=evaluation)

    def _trainer_for(self, spec: Spec, artifact: bytes | None) -> Trainer:
        """The trainer, made anew when what it trains changes (a Spec is published again with
        each artifact)."""
        key = (dataclasses.replace(spec, artifact=None), spec.artifact if artifact else None)
        if self._trainer is None or self._trainer_key != key:
            if self.profile is not None:  # the profile's batch where it is smaller
                spec = dataclasses.replace(
                    spec, batch_size=min(spec.batch_size, self.profile.batch_size)
                )
            self._trainer = make_trainer(self.backend, spec, artifact=artifact)
            self._trainer_key = key
        return self._trainer

    def _encode(
        self, update: Update, model: Model, spec: Spec, seed: int, session: str
    ) -> tuple[bytes, Update]:
        """The update's payload in this device's codec, and the update as the coordinator
        decodes it; a lossy codec adds what earlier updates did not send (error feedback) and
        keeps what this one does not."""
        codec = self.codec(spec)
        if not codec.lossy:  # what it decodes is the update's float32 values where kept
            return encode_update(update, model.masks, codec, exact=model.exact), update
        with_residual = self.residual.add(update.deltas, session, model.masks)
        wanted = dataclasses.replace(update, deltas=with_residual)
        payload = encode_update(
            wanted, model.masks, codec, rng=np.random.default_rng(seed), exact=model.exact
        )
        sent = decode_update(payload, model)
        self.residual.keep(wanted.deltas, sent.deltas, session)
        if self.residual_file is not None:
            try:
                self.residual.save(self.residual_file)
            except OSError as exc:
                log.warning("cannot keep the codec's residual in %s: %s", self.residual_file, exc)
        return payload, sent

    def _epoch_hook(self, round_: int, epochs: int) -> EpochHook:
        """Progress through a round's local epochs: on the live line after each one, and in the
        log every ``EPOCH_REPORT_SECONDS`` when training takes that long (a big dataset on a Pi)."""
        started = said = time.monotonic()

        def epoch_done(done: int) -> None:
            nonlocal said
            self.show(f"round {round_}: training, epoch {done} of {epochs}")
            now = time.monotonic()
            if now - said >= EPOCH_REPORT_SECONDS and done < epochs:
                log.info(
                    "round %d: %d of %d epoch(s) done (%.0f s)", round_, done, epochs, now - started
                )
                said = now

        return epoch_done


def peak_memory_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, because ``ru_maxrss`` survives exec
    and so reports the parent's peak when that was larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
