"""The coordinator's round loop: it orders the steps of a round and owns the run's lifecycle.

Per round: draw the devices (:class:`~fedprune.coordinator.fleet.Fleet`), publish the global model
and the round announcement (:class:`~fedprune.coordinator.downlink.Downlink`), collect updates
until the quorum or the deadline (:class:`~fedprune.coordinator.intake.UpdateIntake`, or the
aggregators' :class:`~fedprune.coordinator.aggregator.PartialSums`), write the aggregate into the
global model (a step of the server optimizer), advance its pruning schedule by one step,
evaluate, and hand one metrics line to ``on_round`` (which checkpoints) and to the monitors. New
behaviour arrives as a new part or a new implementation of one, not as more steps here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from fedprune.coordinator.aggregation import Loss, NormBound, make_aggregator
from fedprune.coordinator.deployment import Deployments
from fedprune.coordinator.fleet import Draw
from fedprune.coordinator.global_model import Evaluator, GlobalModel
from fedprune.coordinator.inbox import Inbox
from fedprune.coordinator.intake import RoundState
from fedprune.coordinator.keys import DeviceKeys
from fedprune.coordinator.parts import Parts
from fedprune.coordinator.result import RoundResult, round_report
from fedprune.coordinator.scaffold import Control
from fedprune.coordinator.server_optimizer import ServerOptimizer
from fedprune.coordinator.telemetry import clipping, tolerance
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import (
    Close,
    Phase,
    Round,
    RoundMetrics,
    Status,
)

__all__ = ["Coordinator"]

log = logging.getLogger("fedprune.coordinator")

GONE_GRACE = 2.0
"""Seconds a round still waits after a device went offline before it closes for want of anyone
left to wait for: a broker that goes down sends every device's last will, then drops us too."""

RECONNECT_GRACE = 15.0
"""Seconds after our own connection came back (a broker restart) in which the devices that went
with it are still waited for: they reconnect with backoff (up to 8 s apart)."""


class Coordinator:
    """Runs the rounds of one coordinator session."""

    def __init__(
        self,
        parts: Parts,
        model: GlobalModel,
        *,
        evaluate: Evaluator,
        loss: Loss | None = None,
        validate: Callable[[], float | None] | None = None,
        on_round: Callable[[RoundResult], None] | None = None,
    ) -> None:
        """Runs the rounds of ``model`` with ``parts`` (:meth:`Parts.build`): ``evaluate``
        measures the global model, ``loss`` the held-out loss of given weights (the screened
        rule), ``validate`` its score on the validation split (``--keep best``), and
        ``on_round`` hears each round's result (and checkpoints)."""
        self.transport, self.config, self.topics = parts.transport, parts.config, parts.topics
        self.codec, self.downlink, self.fleet = parts.codec, parts.downlink, parts.fleet
        self.telemetry, self.observer = parts.telemetry, parts.observer
        self.spec, self.intake, self.partials = parts.spec, parts.intake, parts.partials
        self.inbox = Inbox(parts)  # what the coordinator receives, handled
        self.pruner = model
        self.evaluate = evaluate
        self.loss = loss
        self.validate = validate or (lambda: None)
        self.on_round = on_round or (lambda result: None)
        self.deployments = Deployments(self.fleet, self.downlink, self.observer, self.pump)
        self.results: list[RoundResult] = []
        self.last_round: dict[str, Any] = {}  # who was late, gone, failed or rejected in it
        self._down_counted = 0  # bytes_down already in a round's result
        self._dense = 4 * model.parameters()  # float32 bytes of the model the run began with
        self.bound = NormBound(fixed=self.config.clip_norm, multiple=self.config.clip_multiple)
        self.server = self.config.server()  # its state goes into the checkpoint (rundir.py)
        self.control = Control(multiple=self.config.clip_multiple) if self.config.scaffold else None

    def states(self) -> dict[str, ServerOptimizer | Control]:
        """What the loop keeps across rounds, by the prefix of its arrays in a checkpoint."""
        states: dict[str, ServerOptimizer | Control] = {"server_": self.server}
        if self.control is not None:
            states["control_"] = self.control
        return states

    @property
    def keys(self) -> DeviceKeys | None:
        """The devices' verify keys, read again when they change (the inbox reads them)."""
        return self.inbox.keys

    @keys.setter
    def keys(self, keys: DeviceKeys | None) -> None:
        self.inbox.keys = keys

    @property
    def bytes_down(self) -> int:
        """Bytes the broker delivered to devices so far (downlink.Downlink)."""
        return self.downlink.bytes_down

    @property
    def profiles(self) -> dict[str, str]:
        """The profile each device announced -> the catalogue profile exported for it."""
        return self.fleet.profiles

    # -- the run ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe, publish the Spec (and the training artifact) and say the run waits."""
        self.transport.subscribe(self.topics.all_client_status)
        # With aggregators, they take the updates ($share) and send tallies and partial sums.
        updates = self.topics.aggregators if self.partials else self.topics.all_updates
        self.transport.subscribe(updates, retained=False)  # a device's retained update: stale
        self.spec.publish()
        log.info(
            "aggregation %s tolerates %s; updates clipped to %s",
            self.config.aggregation,
            tolerance(self.config),
            clipping(self.config),
        )
        self.status(Phase.WAITING, 0)

    def train(self) -> list[RoundResult]:
        """Announce the run, wait for the clients and run every round not run yet."""
        self.start()
        first = len(self.results) + 1
        if first <= self.config.rounds:
            self.wait_for_clients(self.config.min_clients)
        for round_ in range(first, self.config.rounds + 1):
            self.run_round(round_)
        return self.results

    def run(self) -> list[RoundResult]:
        self.train()
        self.finish()
        return self.results

    def resume(self, results: list[RoundResult]) -> None:
        """Continue after the rounds of ``results`` (a checkpoint's): :meth:`train` runs the
        rest. The model, the schedule and the ledger come with the checkpoint; ``bytes_down``
        goes on from what those rounds sent (not what the killed round had sent)."""
        self.results = list(results)
        restored = sum(r.bytes_down for r in results)
        self.downlink.bytes_down += restored
        self._down_counted += restored
        self.telemetry.resume(self.results)
        for result in results:
            self.bound.observe(result.norm_median)
        if results:
            log.info("resuming after round %d of %d", results[-1].round, self.config.rounds)

    def wait_for_clients(self, count: int) -> None:
        """Wait up to ``join_timeout`` for ``count`` clients online, then read every hello that is
        already queued, so that clients joining together are all in the first selection."""
        deadline = time.monotonic() + self.config.join_timeout
        while len(self.fleet) < count:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"only {len(self.fleet)} of {count} clients online after waiting"
                    f" {self.config.join_timeout:.0f} s{self.fleet.turned_away_why()}"
                )
            self.pump(0.2)
        while self.pump(0.0):
            pass

    def run_round(self, round_: int) -> RoundResult:
        """One round: draw, publish, collect, aggregate, prune, evaluate, report."""
        started = time.perf_counter()
        draw = self._draw(round_)
        model = self.pruner.model()
        aggregator = make_aggregator(
            self.config.aggregation,
            [w.shape for w in model.weights],
            clip_norm=self.bound.of(model.weights),
            trim=self.config.trim,
            loss=self.loss,
        )
        aggregator.control = self.control
        announcement, sent = self._announce(round_, model, draw, aggregator.clip_norm)
        self.observer.round_started(round_, draw.selected, announcement.deadline, sent)
        self.status(Phase.TRAINING, round_)
        state = RoundState(
            round=round_,
            model=model,
            announcement=announcement,
            selected=set(draw.selected),
            aggregator=aggregator,
        )
        self.intake.open(state)
        deadline = time.monotonic() + self.config.round_timeout
        while not self._closed(state) and time.monotonic() < deadline:
            self.pump(0.1)
        if self.partials is not None:
            self.partials.gather(
                state,
                pump=self.pump,
                close=lambda: self.downlink.publish(
                    self.topics.close, Close(round=round_), retain=False
                ),
            )
        self.intake.close()
        self.downlink.holders = set(state.reported)  # they hold this model: a change's base
        delta = state.aggregator.delta(model.weights)
        if delta is not None:
            self.pruner.set_weights(self.server.step(model, delta))
            if state.aggregator.left_out:
                log.info(
                    "round %d: left out the update(s) of %s: without each, the held-out loss"
                    " was lower",
                    round_,
                    ", ".join(state.aggregator.left_out),
                )
        else:
            log.warning("round %d: no valid update arrived; the model is unchanged", round_)
        if self.control is not None:
            self.control.close(model, len(self.fleet))
        self.pruner.step(round_)
        if self.pruner.rebuild_due(round_) and self.pruner.rebuild():
            self._rebuilt(round_)
        return self._ended(state, len(draw.selected), time.perf_counter() - started)

    def _draw(self, round_: int) -> Draw:
        """The round's draw, once a device that can train it is online. Everyone may have gone
        (their last wills, or forged ones, read while waiting): then it waits again."""
        while True:
            self.wait_for_clients(1)
            draw = self.fleet.select(round_)
            if draw.selected:
                return draw
            if len(self.fleet):
                raise ConfigError(
                    f"none of the {len(self.fleet)} online clients can train this"
                    f" model ({self.fleet.why_none_can_train()})"
                )

    def _announce(
        self, round_: int, model: Model, draw: Draw, norm_bound: float
    ) -> tuple[Round, int]:
        """Publish the round's model and its announcement; the announcement and the bytes each
        selected device receives."""
        limit = self.fleet.fit_ids(draw.selected)
        release, model_bytes = self.downlink.publish_model(
            round_, model, draw.selected, limit=limit, mode=self.config.downlink, codec=self.codec
        )
        control = None
        if self.control is not None:
            control, more = self.downlink.publish_control(
                round_, self.control.payload(model), limit, receivers=len(draw.selected)
            )
            model_bytes += more
        announcement = Round(
            round=round_,
            model_version=round_,
            deadline=time.time() + self.config.round_timeout,
            duration=self.config.round_timeout,
            session=self.telemetry.session,
            draw=draw.draw,
            cutoff=draw.cutoff,
            local_epochs=self.config.local_epochs,
            architecture=self.spec.architecture,
            model=release.model,
            delta=release.delta,
            base=release.base,
            norm_bound=norm_bound,
            learning_rate=self.config.learning_rate_of(round_),
            control=control,
        )
        size = self.downlink.publish(self.topics.round, announcement, receivers=len(self.fleet))
        self.downlink.joining["round"] = size
        return announcement, model_bytes + size

    def _ended(self, state: RoundState, drawn: int, seconds: float) -> RoundResult:
        """Evaluate, and report the round: its metrics line, published, and its report."""
        result = RoundResult.of(
            state,
            self.evaluate(),
            drawn=drawn,
            dense=self._dense,
            sparsity=self.pruner.sparsity(),
            parameters=self.pruner.parameters(),
            bytes_down=self.bytes_down - self._down_counted,  # since the last round's end
            seconds=seconds,
            validation=self.validate(),
        )
        self.last_round = round_report(state, set(self.fleet))
        self._down_counted = self.bytes_down
        self.results.append(result)
        self.bound.observe(result.norm_median)  # the next round's bound (as on resume)
        self.downlink.publish(self.topics.metrics, RoundMetrics(values=result.to_dict()))
        self.observer.round_ended(result, state.late())
        self.on_round(result)
        return result

    def _rebuilt(self, round_: int) -> None:
        """The model was rebuilt smaller (unit pruning): publish its Spec and training artifact
        again; the next round's model goes whole (no device holds one of this shape)."""
        log.info(
            "round %d: the model is rebuilt without its removed units: %d parameters",
            round_,
            self.pruner.parameters(),
        )
        self.server.cut(self.pruner.cut)  # its state goes on, cut as the weights were
        if self.control is not None:
            self.control.reset()  # as the devices' c_i: c stays their mean
        self.downlink.forget_model()
        self.intake.forget_previous()  # late updates of the old shapes cannot count any more
        self.spec.publish()

    def _closed(self, state: RoundState) -> bool:
        """Whether the round can close: its quorum of the selected devices (late joiners among
        them once accepted) reported, or no selected device that is still online has yet to
        answer (one whose connection dropped, its last will, is not waited for)."""
        needed = max(1, math.ceil(self.config.quorum * len(state.selected)))
        if len(state.reported) >= needed:
            return True
        if time.monotonic() - self.fleet.left_at < GONE_GRACE or (
            self.transport.steady_for() < RECONNECT_GRACE
        ):
            return False  # a broker restart drops everyone at once: they will be back soon
        return not any(c not in state.responded and c in self.fleet for c in state.selected)

    # -- receiving -------------------------------------------------------------------------------

    def pump(self, timeout: float) -> bool:
        """Handle one message if one arrives within ``timeout`` seconds (inbox.Inbox)."""
        return self.inbox.pump(timeout)

    # -- what devices read ----------------------------------------------------------------------

    def status(self, phase: Phase, round_: int, *, deploy: list[str] | None = None) -> None:
        status = Status(
            phase=phase,
            round=round_,
            rounds=self.config.rounds,
            deploy=deploy or [],
            session=self.telemetry.session,
        )
        size = self.downlink.publish(self.topics.status, status, receivers=len(self.fleet))
        self.downlink.joining["status"] = size
        self.observer.phase(phase, round_)

    # -- the end ---------------------------------------------------------------------------------

    def abort(self) -> None:
        """Tell the clients the run stopped on an error (best effort: the broker may be gone)."""
        self.downlink.clear_round()
        status = Status(
            phase=Phase.ABORTED, round=0, rounds=self.config.rounds, session=self.telemetry.session
        )
        self.downlink.publish(self.topics.status, status, receivers=len(self.fleet))
        self.observer.phase(
            Phase.ABORTED, self.telemetry.last.run.round if self.telemetry.last else 0
        )
        self.transport.flush(timeout=5)

    def finish(self, *, deployed: list[str] | None = None) -> None:
        """Clear the round state and say the run is over (and which profiles got a model)."""
        self.downlink.clear_round()
        self.status(Phase.FINISHED, self.config.rounds, deploy=deployed)
        if not self.transport.flush(timeout=30):
            log.warning("the broker did not acknowledge the final status in time")
