"""Aggregators: updates summed in several processes, their partial sums added (docs/scaling.md).

``fedprune-aggregator`` takes a share of every round's updates and sends the coordinator their
partial sum. Run N of them next to ``fedprune-coordinator --aggregators N``. Each subscribes to
the devices' update topics through an MQTT 5 shared subscription (``$share/GROUP/...``: the broker
hands every message to one member of the group), follows the run's round and model messages as a
device does, and verifies, validates and sums what it receives with the coordinator's own
:class:`~fedprune.coordinator.intake.UpdateIntake`. It tells the coordinator every quarter second
whom it has accepted (:class:`~fedprune.protocol.messages.Tally`), so that the round closes as it
would otherwise, and follows the others' tallies, so that a device's resend the broker hands it is
answered, not summed twice; when the coordinator closes the round, it sends its FedAvg partial:
the average delta of its updates and their samples. :class:`PartialSums` is the coordinator's side:
it counts the tallies and adds the partials up. Aggregators sign with the coordinator's key (they
are the coordinator, spread over processes). With mosquitto, which hands out messages one by one,
a device's update must be one message (``--max-payload`` at least the update's size), or its chunks
reach different aggregators.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedprune import __version__
from fedprune.coordinator.aggregation import make_aggregator
from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.downlink import Downlink
from fedprune.coordinator.fleet import Fleet
from fedprune.coordinator.intake import RoundState, UpdateIntake
from fedprune.coordinator.keys import DeviceKeys
from fedprune.coordinator.observer import Observer
from fedprune.coordinator.options import add_run_arguments, config_from
from fedprune.coordinator.validation import Limits
from fedprune.protocol.chunks import Collector
from fedprune.protocol.codec import Codec, Update, decode_model, decode_update, encode_update
from fedprune.protocol.connection import Reminder, check_exposure
from fedprune.protocol.envelope import receive
from fedprune.protocol.errors import FedpruneError, ReplayError, WireError, print_error
from fedprune.protocol.messages import (
    COORDINATOR,
    Chunk,
    Close,
    Message,
    Notice,
    Phase,
    Round,
    Status,
    Tally,
)
from fedprune.protocol.options import add_broker_arguments, add_insecure_argument, name
from fedprune.protocol.signing import Trust
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport, Transport, topic_matches

PROG = "fedprune-aggregator"
TALLY_SECONDS = 0.25

PARTIAL_WAIT = 30.0
"""Seconds the coordinator waits for its aggregators' partial sums once a round is closed."""

log = logging.getLogger("fedprune.aggregator")


# -- the coordinator's side ----------------------------------------------------------------------


@dataclass(kw_only=True)
class _Round:
    """What the aggregators sent of one round."""

    round: int
    taken_by: dict[str, str] = field(default_factory=dict)  # device -> the aggregator that took it
    # each aggregator's chunks apart: two with nothing to add send the same bytes
    parts: dict[str, Collector] = field(default_factory=dict)
    partials: dict[str, Update] = field(default_factory=dict)  # by aggregator, once closed
    norms: dict[str, list[float]] = field(default_factory=dict)  # its updates' (NormBound)


class PartialSums:
    """The coordinator's side of ``expected`` aggregators: their tallies count in the round being
    collected; once it is closed, their partial sums are added into its aggregate."""

    def __init__(self, topics: Topics, trust: Trust, *, expected: int, session: str = "") -> None:
        self.topics = topics
        self.trust = trust  # the coordinator's own key: aggregators sign with it
        self.expected = expected
        self.session = session  # the coordinator's: what the aggregators send answers it
        self.root = topics.aggregators.removesuffix("/#")
        self._round: _Round | None = None

    def on_message(self, topic: str, payload: bytes, state: RoundState | None) -> None:
        """A tally or a chunk of a partial sum from an aggregator, for the round ``state``."""
        if state is None or not payload:
            return
        if self._round is None or self._round.round != state.round:
            self._round = _Round(round=state.round)
        sums = self._round
        aggregator = topic[len(self.root) + 1 :].split("/")[0]
        try:
            message = receive(
                payload, self.trust, sender=COORDINATOR, run=self.topics.run, session=self.session
            ).message
            if isinstance(message, Tally) and message.round == state.round:
                self._tally(state, sums, aggregator, message)
            elif isinstance(message, Chunk) and f"/partial/{state.round}/" in topic:
                if aggregator not in sums.parts and len(sums.parts) >= 4 * self.expected:
                    raise WireError(f"more aggregators than the {self.expected} expected")
                whole = sums.parts.setdefault(aggregator, Collector()).add(message)
                if whole is not None:
                    sums.partials[aggregator] = decode_update(whole, state.model)
        except WireError as exc:
            log.warning("ignored a message on %s: %s", topic, exc)

    @staticmethod
    def _tally(state: RoundState, sums: _Round, aggregator: str, tally: Tally) -> None:
        for client_id in tally.reported:
            taken = sums.taken_by.setdefault(client_id, aggregator)
            if taken != aggregator:
                log.error(
                    "round %d: %s's update was summed by two aggregators (%s and %s): it"
                    " weighs twice in this round",
                    state.round,
                    client_id,
                    taken,
                    aggregator,
                )
        state.reported.update(c for c in tally.reported if c in state.selected)
        state.responded.update(c for c in tally.responded if c in state.selected)
        for reason, count in tally.rejected.items():
            state.rejected[str(reason)[:32]] += max(0, int(count))
        state.bytes_up += max(0, tally.bytes_up)
        sums.norms.setdefault(aggregator, []).extend(
            n for n in tally.norms[: len(tally.reported)] if math.isfinite(n) and n >= 0
        )

    def gather(
        self, state: RoundState, *, close: Callable[[], object], pump: Callable[[float], bool]
    ) -> None:
        """Close the round for the aggregators and add up their partial sums (FedAvg: each is
        its average delta and its weight, the samples behind it)."""
        if self._round is None or self._round.round != state.round:
            self._round = _Round(round=state.round)
        sums = self._round
        close()
        end = time.monotonic() + PARTIAL_WAIT
        while len(sums.partials) < self.expected and time.monotonic() < end:
            pump(0.1)
        if len(sums.partials) < self.expected:
            log.warning(
                "round %d: %d of %d aggregators sent their partial sum in %.0f s",
                state.round,
                len(sums.partials),
                self.expected,
                PARTIAL_WAIT,
            )
        for aggregator, partial in sums.partials.items():
            weight = partial.metrics.get("weight", 0.0)
            if weight > 0:
                state.aggregator.merge(
                    dataclasses.replace(partial, num_samples=1),
                    weight=weight,
                    norms=sums.norms.get(aggregator, []),
                )


# -- an aggregator process ------------------------------------------------------------------------


class ShareAggregator:
    """Sums the updates the broker hands this process, with the coordinator's update intake."""

    def __init__(self, transport: Transport, config: RunConfig, *, name: str, group: str) -> None:
        signer, trust = config.signatures()
        # The devices' keys, read again when their folder changes, as the coordinator does
        self.keys = DeviceKeys(config.device_keys) if config.device_keys else None
        self.transport = transport
        self.config = config
        self.name, self.group = name, group
        self.topics = Topics(config.run)
        self.downlink = Downlink(transport, self.topics, signer=signer)
        self.own = Trust() if signer is None else Trust.of({COORDINATOR: signer.verify_key})
        codec = None if config.codec == "auto" else Codec.parse(config.codec)
        self.fleet = Fleet(
            seed=config.seed,
            clients_per_round=config.clients_per_round,
            max_payload=config.max_payload,
            codec=codec,
        )
        self.intake = UpdateIntake(
            fleet=self.fleet,
            trust=trust,
            limits=Limits(),
            codec=codec,
            clients_per_round=config.clients_per_round,
            staleness_weight=0.0,
            observer=Observer(),
            notify=self._notify,
            run=config.run,
            weight_cap=config.weight_cap,
        )
        self.rounds = 0  # rounds whose partial it sent
        self.taken = 0  # updates it accepted, all rounds
        self._announced: Round | None = None
        self._models = Collector()
        self._model: tuple[str, bytes] | None = None  # the last model assembled, by SHA-256
        self._begun: tuple[str, int] = ("", 0)  # the (session, round) last collected
        self._told = Told()
        self._ended = False
        self._elsewhere: set[str] = set()  # devices another aggregator took this round

    def _notify(self, client_id: str, notice: Notice) -> None:
        self.downlink.publish(self.topics.inbox(client_id), notice, retain=False)

    def serve(
        self, *, timeout: float | None = None, remind: Callable[[], None] | None = None
    ) -> None:
        """Aggregate until the coordinator says the run is over (or ``timeout`` seconds pass);
        ``remind`` is called on each turn (a ``Reminder`` of an exposed broker)."""
        t = self.topics
        for pattern in (
            t.all_client_status,
            t.status,
            t.round,
            t.all_models,
            t.close,
            t.tally("+"),
            t.shared_updates(self.group),
        ):
            self.transport.subscribe(pattern)
        log.info(
            "aggregator %s takes its share of run %r's updates (group %s)",
            self.name,
            t.run,
            self.group,
        )
        end = None if timeout is None else time.monotonic() + timeout
        while not self._ended and (end is None or time.monotonic() < end):
            item = self.transport.get(0.1)
            if item is not None and item[1]:
                self.handle(*item)
            self._tally()
            if self.keys is not None:
                self.intake.reload_keys(self.keys)
            if remind is not None:
                remind()

    def handle(self, topic: str, payload: bytes) -> None:
        """One message: a device's hello or update, another aggregator's tally, or one of the
        coordinator's (round, model, close, status)."""
        t = self.topics
        if (parsed := t.parse_update(topic)) is not None:
            self._on_update(*parsed, payload)
        elif (client_id := t.client_of_status(topic)) is not None:
            change = self.fleet.on_status(client_id, payload, self.intake.trust, run=t.run)
            if change is not None and change.hello is not None:
                self.intake.claimed(client_id, change.hello.unanswered)
        elif topic != t.tally(self.name):  # its own tallies come back too
            self._follow(topic, payload)

    def _on_update(self, client_id: str, round_text: str, index: str, payload: bytes) -> None:
        """As the coordinator's intake, but the update of a device that another aggregator took
        (a resend the broker handed to this one) is answered, not summed a second time."""
        state = self.intake.current
        if state is None or client_id not in self._elsewhere or round_text != str(state.round):
            self.intake.on_message(client_id, round_text, payload)
            return
        state.bytes_up += len(payload)
        if index == "0":
            log.info(
                "round %d: %s's update, taken by another aggregator, came again here; answered",
                state.round,
                client_id,
            )
            self._notify(client_id, Notice(round=state.round, accepted=True, reason=""))

    def _follow(self, topic: str, payload: bytes) -> None:
        """The coordinator's round, model, close and status, and the other aggregators' tallies
        (all sent as the coordinator); what does not make sense is logged and ignored."""
        try:
            envelope = receive(payload, self.own, sender=COORDINATOR, run=self.topics.run)
            session = self._begun[0]
            if envelope.session and session and envelope.session < session:
                raise ReplayError(f"of an earlier coordinator session ({envelope.session[:32]})")
            self._take(topic, envelope.message)
        except WireError as exc:
            log.warning("ignored a message on %s: %s", topic, exc)

    def _take(self, topic: str, message: Message) -> None:
        state = self.intake.current
        if isinstance(message, Tally):
            if state is not None and message.round == state.round:
                self._elsewhere.update(message.reported)
        elif isinstance(message, Round):
            self._announced = message
        elif isinstance(message, Chunk) and topic_matches(self.topics.all_models, topic):
            whole = self._models.add(message)
            if whole is not None:
                self._model = (message.sha256, whole)
        elif isinstance(message, Close):
            self._close(message.round)
        elif isinstance(message, Status) and message.phase in (Phase.FINISHED, Phase.ABORTED):
            self._ended = True
        announced, model = self._announced, self._model
        fresh = announced is not None and (announced.session, announced.round) != self._begun
        if fresh and announced and model and model[0] == announced.model.sha256:
            self._begin(announced, model[1])  # (the model may be the same round after round)

    def _begin(self, announced: Round, payload: bytes) -> None:
        """Collect ``announced``'s updates, against its model."""
        self._begun = (announced.session, announced.round)
        # Updates answer this session, and so does what this aggregator sends (protocol 1.10)
        self.intake.session = self.downlink.session = announced.session
        self._elsewhere = set()
        model = decode_model(payload)
        self.intake.limits = Limits.for_model(model, self.config)
        self.intake.open(
            RoundState(
                round=announced.round,
                model=model,
                announcement=announced,
                selected={c for c in self.fleet if announced.selects(c)},
                aggregator=make_aggregator(
                    "fedavg", [w.shape for w in model.weights], clip_norm=announced.norm_bound
                ),
            )
        )
        self._told = Told()

    def _tally(self, *, now: bool = False) -> None:
        """Tell the coordinator what changed since the last tally (every quarter second)."""
        state = self.intake.current
        told = self._told
        if state is None or not (now or time.monotonic() - told.at >= TALLY_SECONDS):
            return
        tally = Tally(
            round=state.round,
            reported=sorted(state.reported - told.reported),
            responded=sorted(state.responded - told.responded),
            rejected=dict(state.rejected - told.rejected),
            bytes_up=state.bytes_up - told.bytes_up,
            norms=state.aggregator.norms[told.norms :],
        )
        told.at = time.monotonic()
        if tally.reported or tally.responded or tally.rejected or tally.bytes_up or now:
            self.downlink.publish(self.topics.tally(self.name), tally, retain=False)
            self._told = Told(
                reported=set(state.reported),
                responded=set(state.responded),
                rejected=Counter(state.rejected),
                bytes_up=state.bytes_up,
                norms=len(state.aggregator.norms),
                at=told.at,
            )

    def _close(self, round_: int) -> None:
        """Send the round's partial sum: the average delta of the updates taken and the samples
        behind it (a zero weight when there were none)."""
        state = self.intake.current
        if state is None or state.round != round_:
            return
        self._tally(now=True)
        summed = state.aggregator
        zeros = [np.zeros_like(w) for w in state.model.weights]
        metrics = {
            "weight": float(getattr(summed, "total_samples", 0.0)),
            "count": float(summed.count),
            "n_eval": summed.evaluated,
            **summed.client_metrics(),
        }
        partial = Update(round=round_, num_samples=1, deltas=summed.apply(zeros), metrics=metrics)
        payload = encode_update(partial, state.model.masks)
        prefix = self.topics.partial(self.name, round_)
        self.downlink.publish_chunked(
            prefix, payload, self.config.max_payload, receivers=0, retain=False
        )
        self.transport.flush(timeout=10)
        self.rounds += 1
        self.taken += summed.count
        log.info("round %d: sent the partial sum of %d update(s)", round_, summed.count)
        self.intake.close()


@dataclass(kw_only=True)
class Told:
    """What an aggregator's last tally said (the next one says what changed since)."""

    reported: set[str] = field(default_factory=set)
    responded: set[str] = field(default_factory=set)
    rejected: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    norms: int = 0  # how many of the round's update norms it sent
    at: float = 0.0


AGGREGATOR_OPTIONS = ("run", "signing_key", "device_keys", "max_payload", "weight_cap")
"""The run's options an aggregator takes, given as to its coordinator."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Take a share of a run's device updates (MQTT 5 shared subscription), verify "
        "and sum them, and send the coordinator the partial sum (fedprune-coordinator "
        "--aggregators N; docs/scaling.md).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_broker_arguments(p)
    add_insecure_argument(p)
    add_run_arguments(p, AGGREGATOR_OPTIONS)
    p.add_argument(
        "--id",
        type=name,
        default=None,
        help="this aggregator's name (default: host name and process id)",
    )
    p.add_argument(
        "--group",
        type=name,
        default="fedprune",
        help="shared subscription group (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default: until the run ends)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    aggregator_id = args.id or f"{socket.gethostname()}-{os.getpid()}"
    try:
        config = config_from(args)
        settings = config.broker_settings()
        exposed = check_exposure(settings, signed=bool(config.signing_key), insecure=args.insecure)
        transport = MqttTransport(
            settings,
            client_id=f"fedprune-aggregator-{config.run}-{aggregator_id}",
            max_payload=config.max_payload,
            persistent=True,  # its share of the updates waits on the broker while it is away
        )
        aggregator = ShareAggregator(transport, config, name=aggregator_id, group=args.group)
        try:
            remind = None if exposed is None else Reminder(log, exposed)
            aggregator.serve(timeout=args.timeout, remind=remind)
        finally:
            transport.close()
    except (FedpruneError, OSError) as exc:
        return print_error(PROG, exc)
    except KeyboardInterrupt:
        return 130
    log.info("done: %d round(s), %d update(s) taken", aggregator.rounds, aggregator.taken)
    return 0


if __name__ == "__main__":
    sys.exit(main())
