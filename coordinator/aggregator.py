"""``fedprune-aggregator``: take a share of every round's updates and send the coordinator their
partial sum (docs/scaling.md).

Run N of them next to ``fedprune-coordinator --aggregators N``. Each subscribes to the devices'
update topics through an MQTT 5 shared subscription (``$share/GROUP/...``: the broker hands every
message to one member of the group), follows the run's round and model messages as a device does,
and verifies, validates and sums what it receives exactly as the coordinator would (it *is* the
coordinator's round code, without the model, the schedule or the telemetry). It tells the
coordinator every quarter second whom it has accepted, so that the round closes as it would
otherwise; when the coordinator closes the round, it sends its FedAvg partial: the average delta of
its updates and their samples. The coordinator adds the partials up. Aggregators sign with the
coordinator's key (they are the coordinator, spread over processes). With mosquitto, which hands
out messages one by one, a device's update must be one message (``--max-payload`` at least the
update's size), or its chunks reach different aggregators.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections import Counter
from typing import cast

import numpy as np

from fedprune import __version__
from fedprune.coordinator.aggregation import make_aggregator
from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.observer import Observers
from fedprune.coordinator.pruning import Pruner
from fedprune.coordinator.rounds import Collection, Coordinator
from fedprune.coordinator.validation import Limits
from fedprune.edge_client.codec import Update, decode_model, encode_update
from fedprune.edge_client.errors import FedpruneError, WireError, print_error
from fedprune.edge_client.options import add_broker_arguments, name
from fedprune.edge_client.transport import MqttTransport, Transport
from fedprune.edge_client.wire import (
    Chunk,
    Close,
    Collector,
    Notice,
    Phase,
    Round,
    Status,
    Tally,
    Telemetry,
    decode,
    split_to_fit,
)

PROG = "fedprune-aggregator"
TALLY_SECONDS = 0.25

log = logging.getLogger("fedprune.aggregator")


class ShareAggregator(Coordinator):
    """The coordinator's update handling, for the updates the broker hands this process."""

    def __init__(self, transport: Transport, config: RunConfig, *, name: str, group: str) -> None:
        signer, trust = config.signatures()
        no_model = cast(Pruner, None)  # the model comes with each round; nothing is pruned here
        super().__init__(
            transport, config, no_model, evaluate=lambda: None, signer=signer, trust=trust
        )
        self.observer = Observers()  # no ledger, no telemetry: monitors read the coordinator's
        self.name, self.group = name, group
        self.rounds = 0  # rounds whose partial it sent
        self.taken = 0  # updates it accepted, all rounds
        self._announced: Round | None = None
        self._models = Collector()
        self._model: tuple[str, bytes] | None = None  # the last model assembled, by SHA-256
        self._begun: tuple[str, int] = ("", 0)  # the (session, round) last collected
        self._told: tuple[set[str], set[str], Counter[str], int] = (set(), set(), Counter(), 0)
        self._told_at = 0.0
        self._ended = False
        self._elsewhere: set[str] = set()  # devices another aggregator took this round

    def _publish_telemetry(self, snapshot: Telemetry) -> None:
        return  # the coordinator's alone

    def serve(self, *, timeout: float | None = None) -> None:
        """Aggregate until the coordinator says the run is over (or ``timeout`` seconds pass)."""
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
                self._route(*item)
            self._tally()

    def _route(self, topic: str, payload: bytes) -> None:
        t = self.topics
        if topic == t.tally(self.name):
            return  # its own
        tally = topic.startswith(self._aggregators_root)
        if topic not in (t.round, t.close, t.status) and not (
            tally or topic.startswith(f"{t.root}/model/")
        ):
            self.handle(topic, payload)  # an update chunk or a device's hello
            return
        try:
            message = decode(payload, self._own).message
        except WireError as exc:
            log.warning("ignored a message on %s: %s", topic, exc)
            return
        if isinstance(message, Tally):
            state = self._collect
            if tally and state is not None and message.round == state.round:
                self._elsewhere.update(message.reported)
        elif isinstance(message, Round):
            self._announced = message
        elif isinstance(message, Chunk):
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

    def handle(self, topic: str, payload: bytes) -> None:
        """As the coordinator's, but the update of a device that another aggregator took (a
        resend the broker handed to this one) is answered, not summed a second time."""
        parsed = self.topics.parse_update(topic)
        state = self._collect
        if parsed is None or state is None or parsed[0] not in self._elsewhere:
            super().handle(topic, payload)
            return
        client_id, round_text, index = parsed
        if round_text != str(state.round):
            super().handle(topic, payload)
            return
        state.bytes_up += len(payload)
        if index == "0":
            log.info("round %d: %s's update, taken by another aggregator, came again here;"
                     " answered", state.round, client_id)  # fmt: skip
            notice = Notice(round=state.round, accepted=True, reason="")
            self._publish(self.topics.inbox(client_id), notice, retain=False)

    def _begin(self, announced: Round, payload: bytes) -> None:
        """Collect ``announced``'s updates, against its model."""
        self._begun = (announced.session, announced.round)
        self._elsewhere = set()
        model = decode_model(payload)
        dense = 4 * sum(int(np.prod(w.shape)) for w in model.weights)
        config = self.config
        self.limits = Limits(
            max_update_bytes=config.max_update_bytes or 2 * dense + 64 * 1024,
            max_norm=config.max_norm,
            max_samples=config.max_samples,
            max_pending_bytes=config.max_pending_bytes,
        )
        self._collect = Collection(
            round=announced.round,
            model=model,
            announcement=announced,
            selected={c for c in self.clients if announced.selects(c)},
            aggregator=make_aggregator(
                "fedavg", [w.shape for w in model.weights], clip_norm=config.clip_norm
            ),
        )
        self._told, self._told_at = (set(), set(), Counter(), 0), 0.0

    def _tally(self, *, now: bool = False) -> None:
        """Tell the coordinator what changed since the last tally (every quarter second)."""
        state = self._collect
        if state is None or not (now or time.monotonic() - self._told_at >= TALLY_SECONDS):
            return
        reported, responded, rejected, bytes_up = self._told
        tally = Tally(
            round=state.round,
            reported=sorted(state.reported - reported),
            responded=sorted(state.responded - responded),
            rejected=dict(state.rejected - rejected),
            bytes_up=state.bytes_up - bytes_up,
        )
        self._told_at = time.monotonic()
        if tally.reported or tally.responded or tally.rejected or tally.bytes_up or now:
            self._publish(self.topics.tally(self.name), tally, retain=False)
            self._told = (
                set(state.reported),
                set(state.responded),
                Counter(state.rejected),
                state.bytes_up,
            )

    def _close(self, round_: int) -> None:
        """Send the round's partial sum: the average delta of the updates taken and the samples
        behind it (a zero weight when there were none)."""
        state = self._collect
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
        for chunk in split_to_fit(payload, max_payload=self.config.max_payload):
            self._publish(f"{prefix}/{chunk.index}", chunk, retain=False)
        self.transport.flush(timeout=10)
        self.rounds += 1
        self.taken += summed.count
        log.info("round %d: sent the partial sum of %d update(s)", round_, summed.count)
        self._collect = None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Take a share of a run's device updates (MQTT 5 shared subscription), verify "
        "and sum them, and send the coordinator the partial sum (fedprune-coordinator "
        "--aggregators N; docs/scaling.md).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_broker_arguments(p)
    d = RunConfig()
    p.add_argument("--run", type=name, default=d.run, help="run name, as given to the coordinator")
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
        "--signing-key",
        default="",
        metavar="FILE",
        help="the coordinator's signing key (with --device-keys), when the run is signed",
    )
    p.add_argument(
        "--device-keys",
        default="",
        metavar="DIR",
        help="the devices' <id>.pub verify keys, as the coordinator has them",
    )
    p.add_argument(
        "--max-payload",
        type=int,
        default=d.max_payload,
        help="largest MQTT payload, as the coordinator's (default: %(default)s)",
    )
    p.add_argument(
        "--clip-norm",
        type=float,
        default=d.clip_norm,
        help="as the coordinator's (default: 0 = off)",
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
        config = RunConfig(
            run=args.run,
            broker=args.broker,
            ca=args.ca or "",
            cert=args.cert or "",
            key=args.key or "",
            credentials=args.credentials or "",
            signing_key=args.signing_key,
            device_keys=args.device_keys,
            max_payload=args.max_payload,
            clip_norm=args.clip_norm,
        )
        transport = MqttTransport(
            config.broker_settings(),
            client_id=f"fedprune-aggregator-{args.run}-{aggregator_id}",
            max_payload=config.max_payload,
            persistent=True,  # its share of the updates waits on the broker while it is away
        )
        aggregator = ShareAggregator(transport, config, name=aggregator_id, group=args.group)
        try:
            aggregator.serve(timeout=args.timeout)
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
