"""Update intake: what a round receives from devices, judged and summed one message at a time.

A :class:`RoundState` is one round being collected; :class:`UpdateIntake` takes each message on a
device's update topic into it: a QoS 1 redelivery is dropped by the digest of its bytes; the
message must be signed by the device whose topic it is on; its chunks are reassembled apart per
(device, round, payload SHA-256), within memory limits; the whole update is validated and added to
the round's streaming aggregate, or rejected, counted by reason and answered with a notice. A late
update of the previous round counts with ``staleness_weight``. Both the coordinator and each
``fedprune-aggregator`` run one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fedprune.coordinator.aggregation import Aggregator
from fedprune.coordinator.fleet import Fleet
from fedprune.coordinator.keys import DeviceKeys
from fedprune.coordinator.observer import Observer
from fedprune.coordinator.validation import Limits, Reason, Rejected, classify, validate
from fedprune.protocol.chunks import Reassembler
from fedprune.protocol.codec import Codec, Model, Update
from fedprune.protocol.envelope import receive
from fedprune.protocol.errors import ReplayError, SignatureError, WireError
from fedprune.protocol.messages import Chunk, Failed, Notice, Round, Unanswered
from fedprune.protocol.signing import Trust

log = logging.getLogger("fedprune.coordinator")

REPORTED_REASONS = 10_000
"""The most devices a round's report names with their rejection (the counts are all there)."""

Slot = tuple[str, str, str]
"""A payload in a round: (device, round as on its topic, the payload's SHA-256)."""


@dataclass(kw_only=True)
class RoundState:
    """The round being collected."""

    round: int
    model: Model
    announcement: Round
    selected: set[str]  # by the draw, from the devices online then (and later joiners it selects)
    aggregator: Aggregator
    reported: set[str] = field(default_factory=set)
    responded: set[str] = field(default_factory=set)  # reported, or rejected: no need to wait
    rejected: Counter[str] = field(default_factory=Counter)
    codecs: Counter[str] = field(default_factory=Counter)  # accepted updates by codec
    bytes_up: int = 0
    # Payloads in assembly, by slot: a forged or garbled payload on a device's topic is assembled
    # and judged apart from the device's own.
    assembling: dict[Slot, Reassembler] = field(default_factory=dict)
    held: int = 0  # bytes held by all of ``assembling``, bounded by Limits.max_pending_bytes
    handled: set[Slot] = field(default_factory=set)  # accepted or rejected
    verdicts: dict[Slot, Notice] = field(default_factory=dict)  # the notices of those
    seen: set[bytes] = field(default_factory=set)  # digests of the update messages received
    unreadable: set[tuple[str, str]] = field(default_factory=set)
    why: dict[str, str] = field(default_factory=dict)  # device -> its last rejection (report)
    stale: list[str] = field(default_factory=list)  # devices whose previous-round update counted
    # devices that said they resent an update for want of a notice (overdue until it is in)
    claimed: set[str] = field(default_factory=set)
    sample_cap: float = math.inf  # the most samples an update weighs (UpdateIntake.weight_cap)
    capped: list[str] = field(default_factory=list)  # devices whose claim counted as the cap

    def overdue(self) -> set[str]:
        return self.claimed - self.responded

    def late(self) -> list[str]:
        """The selected devices that had not answered when the round closed."""
        return sorted(self.selected - self.responded)


def sample_cap(weight_cap: float, declared: list[int]) -> float:
    """The most samples an update weighs: ``weight_cap`` times the median of the sample counts
    its round's devices ``declared`` (no cap: 0, or nothing declared)."""
    return weight_cap * statistics.median(declared) if weight_cap and declared else math.inf


class UpdateIntake:
    """Receives, reassembles, validates and sums the updates of the round being collected.

    ``notify`` sends a device its notice. Updates must be made for run ``run`` (any, if empty)
    and answer coordinator session ``session`` (protocol 1.10), whose claims of unanswered
    updates count too (``Hello.unanswered``); another run's or session's are replays, dropped."""

    def __init__(
        self,
        *,
        fleet: Fleet,
        trust: Trust,
        limits: Limits,
        codec: Codec | None,
        clients_per_round: int,
        staleness_weight: float,
        observer: Observer,
        notify: Callable[[str, Notice], None],
        run: str = "",
        session: str = "",
        weight_cap: float = 0.0,
    ) -> None:
        self.fleet = fleet
        self.trust = trust
        self.limits = limits
        self.codec = codec
        self.clients_per_round = clients_per_round
        self.staleness_weight = staleness_weight
        self.observer = observer
        self.notify = notify
        self.run = run
        self.session = session
        self.weight_cap = weight_cap
        self.current: RoundState | None = None
        self.previous: RoundState | None = None  # late updates may still count (staleness)
        self.dropped = 0  # messages refused for a missing or bad signature, or replayed

    def reload_keys(self, keys: DeviceKeys) -> list[str]:
        """Read the devices' keys again if due (``DeviceKeys.reload``): from then on, what a
        revoked device sends is dropped, and it leaves the fleet. The devices that left."""
        revoked = keys.reload()
        if revoked is None:
            return []
        self.trust = keys.trust
        return [c for c in sorted(revoked) if self.fleet.offline(c)]

    def open(self, state: RoundState) -> None:
        """Collect ``state``'s round from now on. No update weighs more than ``weight_cap`` times
        the median of the sample counts its selected devices declared (0: no cap): a device's
        claim is its own, a few devices cannot move the median."""
        declared = [
            hello.num_samples for c in state.selected if (hello := self.fleet.devices.get(c))
        ]
        state.sample_cap = sample_cap(self.weight_cap, declared)
        self.current = state

    def close(self) -> RoundState:
        """Stop collecting: what had not arrived whole never will count. The round is kept as
        the previous one when late updates count."""
        state = self.current
        assert state is not None, "no round is being collected"
        self.current = None
        state.assembling.clear()
        self.previous = state if self.staleness_weight else None
        return state

    def forget_previous(self) -> None:
        """Late updates of the last round cannot count any more (the model was rebuilt)."""
        self.previous = None

    # -- a message on a device's update topic ----------------------------------------------------

    def on_message(self, client_id: str, round_text: str, payload: bytes) -> None:
        """One message on ``client_id``'s update topic for ``round_text``: a chunk of an update
        or a ``Failed`` training. Whatever is wrong with it is data: counted, logged, answered."""
        state = self.current
        if state is None:
            return
        digest = hashlib.sha256(payload).digest()
        if digest in state.seen:
            return  # a QoS 1 redelivery (after a reconnect): handled and counted once already
        state.seen.add(digest)
        state.bytes_up += len(payload)
        chunk: Chunk | None = None
        slot: Slot | None = None
        target = state  # the round the payload is for, once known: its chunks are kept there
        try:
            message = receive(
                payload, self.trust, sender=client_id, run=self.run or None, session=self.session
            ).message
            self.observer.received(client_id, len(payload))  # the device's own bytes
            if isinstance(message, Failed):
                if round_text != str(state.round) or message.round != state.round:
                    raise Rejected(
                        Reason.ROUND, f"failure for round {round_text}, now {state.round}"
                    )
                raise Rejected(Reason.FAILED, f"its training failed: {message.reason[:200]}")
            if not isinstance(message, Chunk):
                raise WireError(f"expected a chunk, got {message.KIND}")
            chunk = message
            slot = (client_id, round_text, chunk.sha256)
            if self._answered(state, slot, chunk):
                return  # the rest of a payload already judged, or a copy of it
            target = self._round_of(round_text, state)
            if self._answered(target, slot, chunk):
                return
            update = self._take(target, slot, chunk)
            if update is None:
                return
        except SignatureError as exc:
            # Not the device's (a forgery, or a replay of one it made for another run or
            # session): counted and logged, and kept away from the device's round state.
            reason = Reason.REPLAY if isinstance(exc, ReplayError) else Reason.SIGNATURE
            state.rejected[reason.value] += 1
            self.dropped += 1
            self.observer.rejected(client_id, reason.value, str(exc))
            log.warning(
                "round %d: dropped an update chunk on %s's topic: %s", state.round, client_id, exc
            )
            return
        except (WireError, Rejected) as exc:
            # One rejection per payload, not per chunk: the rest of a rejected payload's chunks
            # are ignored like redeliveries; unreadable chunks count once per client and round.
            if slot is not None:
                self._drop(target, slot)
            elif (client_id, round_text) in state.unreadable:
                return
            else:
                state.unreadable.add((client_id, round_text))
            rejected = exc if isinstance(exc, Rejected) else Rejected(classify(exc), str(exc))
            self._reject(state, client_id, rejected, round_text, verdict=(target, slot))
            return
        self._accept(state, target, update, slot)

    def _take(self, target: RoundState, slot: Slot, chunk: Chunk) -> Update | None:
        """Add a chunk to its payload and, once it is whole, validate it: the update, or
        ``None`` while parts are missing."""
        client_id = slot[0]
        joined = client_id not in target.selected  # after the draw, which may select it
        if joined and not (target.announcement.selects(client_id) and client_id in self.fleet):
            raise Rejected(Reason.UNSELECTED, f"{client_id} is not selected this round")
        if client_id in target.reported:
            raise Rejected(Reason.DUPLICATE, f"{client_id} already reported this round")
        complete = self._assemble(target, slot, chunk)
        if complete is None:
            return None
        limits = self.limits.for_device(self.fleet.devices.get(client_id))
        update = validate(complete, target.model, round_=target.round, limits=limits)
        if self.codec is not None and update.codec != self.codec.name:
            raise Rejected(
                Reason.CODEC, f"sent as {update.codec}; this run's codec is {self.codec.name}"
            )
        k = self.clients_per_round
        if joined and 0 < k <= len(target.selected):
            raise Rejected(
                Reason.UNSELECTED,
                f"{client_id} joined after the draw, and round {target.round} has its {k} devices",
            )
        return update

    def _accept(self, state: RoundState, target: RoundState, update: Update, slot: Slot) -> None:
        """Add an accepted update to the round being collected and tell its device."""
        client_id = slot[0]
        share = 1.0  # of its claimed samples that count
        if update.num_samples > target.sample_cap:
            share = target.sample_cap / update.num_samples
            state.capped.append(client_id)
            log.info(
                "round %d: %s claims %d samples; it weighs %d (the cap: %g times the median"
                " its round's devices declared)",
                state.round,
                client_id,
                update.num_samples,
                target.sample_cap,
                self.weight_cap,
            )
        if target is state:
            state.aggregator.add(update, weight=share, source=client_id)
        else:  # late, for the previous round: its deltas where the current model still has
            masks = state.model.masks
            kept = [d if m is None else d * m for d, m in zip(update.deltas, masks, strict=True)]
            weight = self.staleness_weight * share
            state.aggregator.add(
                dataclasses.replace(update, deltas=kept), weight=weight, source=client_id
            )
            state.stale.append(client_id)
            log.info(
                "round %d: counted %s's late update for round %d (weight %g)",
                state.round,
                client_id,
                target.round,
                weight,
            )
        target.selected.add(client_id)  # a late joiner counts from its accepted update on
        state.codecs[update.codec] += 1
        target.reported.add(client_id)
        target.responded.add(client_id)
        self.observer.accepted(client_id, update)
        notice = Notice(round=target.round, accepted=True, reason="")
        target.verdicts[slot] = notice
        self.notify(client_id, notice)

    def _answered(self, state: RoundState, slot: Slot, chunk: Chunk) -> bool:
        """Whether the payload of ``slot`` was judged already. A device that resends it had no
        notice: the first chunk of each copy gets the verdict again."""
        if slot not in state.handled:
            return False
        notice = state.verdicts.get(slot)
        if notice is not None and chunk.index == 0:
            log.info(
                "round %d: %s sent an update it had sent before; answered again",
                state.round,
                slot[0],
            )
            self.notify(slot[0], notice)
        return True

    def _round_of(self, round_text: str, state: RoundState) -> RoundState:
        """The round an update is for: the current one or, when late updates count
        (``staleness_weight``), the previous one."""
        if round_text == str(state.round):
            return state
        previous = self.previous
        if self.staleness_weight and previous and round_text == str(previous.round):
            return previous
        raise Rejected(Reason.ROUND, f"update for round {round_text}, now {state.round}")

    def _assemble(self, state: RoundState, slot: Slot, chunk: Chunk) -> bytes | None:
        """Add a chunk to its payload; the payload once complete. Memory is bounded per payload
        (``max_update_bytes``), per device (``max_payloads_per_device`` in assembly) and in all
        (``max_pending_bytes``), so made-up payloads cannot exhaust the coordinator."""
        limits = self.limits
        assembler = state.assembling.get(slot)
        if assembler is None:
            mine = sum(1 for other in state.assembling if other[:2] == slot[:2])
            if mine >= limits.max_payloads_per_device:
                raise Rejected(Reason.OVERSIZE, f"{slot[0]} has {mine} updates in assembly already")
            assembler = state.assembling[slot] = Reassembler(max_size=limits.max_update_bytes)
        before = assembler.held
        complete = assembler.add(chunk)
        state.held += assembler.held - before
        if state.held > limits.max_pending_bytes:
            raise Rejected(
                Reason.OVERSIZE,
                f"updates in assembly hold {state.held:,} bytes > {limits.max_pending_bytes:,}",
            )
        if complete is not None:
            self._drop(state, slot)
        return complete

    @staticmethod
    def _drop(state: RoundState, slot: Slot) -> None:
        """Forget a payload's chunks; later chunks of it are ignored."""
        assembler = state.assembling.pop(slot, None)
        if assembler is not None:
            state.held -= assembler.held
        state.handled.add(slot)

    def _reject(
        self,
        state: RoundState,
        client_id: str,
        rejected: Rejected,
        round_text: str,
        *,
        verdict: tuple[RoundState, Slot | None],
    ) -> None:
        """Count a rejection in the current round; the notice names the round the payload was
        for (``round_text``, from its topic), so that a device does not take the rejection of
        an old payload for the answer to its current one. ``verdict`` is where to keep it (the
        payload's round and slot), to answer a copy of the payload again."""
        state.rejected[rejected.reason.value] += 1
        if len(state.why) < REPORTED_REASONS:
            state.why[client_id] = str(rejected)[:200]
        not_its_answer = (Reason.ROUND, Reason.UNSELECTED, Reason.SENDER)
        current = round_text == str(state.round)
        if current and client_id in state.selected and rejected.reason not in not_its_answer:
            state.responded.add(client_id)  # its answer for this round is in: do not wait for it
        log.warning("round %d: rejected an update from %s: %s", state.round, client_id, rejected)
        self.observer.rejected(client_id, rejected.reason.value, rejected.detail)
        if round_text.isdigit() and len(round_text) < 10:
            notice = Notice(round=int(round_text), accepted=False, reason=str(rejected))
            target, slot = verdict
            if slot is not None:
                target.verdicts[slot] = notice
            self.notify(client_id, notice)

    # -- a device's claim of an unanswered update ------------------------------------------------

    def claimed(self, client_id: str, claim: Unanswered | None) -> None:
        """A device says (in its hello) that it resends an update for want of a notice: one the
        round has not received is overdue, which monitors show and the log says."""
        state = self.current
        if claim is None or state is None or claim.session != self.session:
            return
        if claim.round != state.round or client_id in state.responded:
            return
        if client_id not in state.selected and not state.announcement.selects(client_id):
            return
        state.claimed.add(client_id)
        loud = len(state.claimed) % 100 == 1  # the first of a round, then one in a hundred
        log.log(
            logging.WARNING if loud else logging.INFO,
            "round %d: %s says it sent an update that has not arrived and resends it (resend %d);"
            " %d update(s) overdue (lost on the way, or held up: see docs/scaling.md)",
            state.round,
            client_id,
            claim.resends,
            len(state.overdue()),
        )
        self.observer.overdue(client_id, claim.resends)
