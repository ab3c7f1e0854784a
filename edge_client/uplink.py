"""What a device sends the coordinator, and how it makes sure an update arrives.

A device is an :class:`Identity` (its hello is retained on its status topic, its last will
replaces it). :class:`Uplink` publishes its hello, its updates in chunks and its failed rounds,
and keeps the last update until the coordinator's notice for that round arrives: without one
:func:`resend_wait` seconds after it was sent, it sends it again (a broker may have lost it) and
says so in its hello (``Hello.unanswered``, protocol 1.9).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fedprune.edge_client.trainer import RULES
from fedprune.protocol.chunks import sha256, split_to_fit
from fedprune.protocol.codec import features
from fedprune.protocol.envelope import encode
from fedprune.protocol.messages import Failed, Hello, Message, Notice, Offline, Round, Unanswered
from fedprune.protocol.signing import SigningKey
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import Transport

log = logging.getLogger("fedprune.client")

RESEND_AFTER = 60.0  # the least a device waits for a notice before it sends an update again


def resend_wait(round_: Round, resends: int, after: float | None = None) -> float:
    """Seconds a device waits for the notice of its update before it sends it again (for the
    ``resends + 1``-th time): ``after`` if given, else half the round's duration and at least
    :data:`RESEND_AFTER`, doubled at each resend. A resend is a safety net for a message the
    broker lost, not a remedy for a coordinator working through a backlog (the broker keeps
    that for it): resending sooner than a long round needs would only lengthen the backlog."""
    first = after or max(RESEND_AFTER, round_.duration / 2)
    return float(first * 2**resends)


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who a client is; its hello is retained on its status topic and its will replaces it."""

    run: str
    client_id: str
    profile: str
    num_samples: int
    backend: str
    max_payload: int = 0  # the largest message it takes (its profile's), 0 = any
    signer: SigningKey | None = field(default=None, repr=False, compare=False)

    def encode(self, message: Message, session: str = "") -> bytes:
        """``message`` as this device's, answering coordinator session ``session`` if given."""
        return encode(
            message, run=self.run, sender=self.client_id, signer=self.signer, session=session
        )

    def hello(
        self,
        installed: str | None = None,
        *,
        deploys: bool = False,
        unanswered: Unanswered | None = None,
    ) -> tuple[str, bytes]:
        """The hello; whether the device installs deployed models, which one it runs (by
        SHA-256) if it has one, and the update it resends for want of a notice."""
        message = Hello(
            client_id=self.client_id,
            profile=self.profile,
            num_samples=self.num_samples,
            backend=self.backend,
            installed=installed,
            deploys=deploys,
            max_payload=self.max_payload,
            codecs=features(),
            training=list(RULES),
            unanswered=unanswered,
        )
        return Topics(self.run).client_status(self.client_id), self.encode(message)

    def will(self) -> tuple[str, bytes]:
        topic = Topics(self.run).client_status(self.client_id)
        return topic, self.encode(Offline(who=self.client_id))


@dataclass(kw_only=True)
class Pending:
    """The last update sent, until the coordinator's notice for its round arrives."""

    round: int
    session: str
    payload: bytes
    sent_at: float  # monotonic, when it was last sent
    resends: int = 0

    def claim(self) -> Unanswered:
        return Unanswered(
            session=self.session,
            round=self.round,
            sha256=sha256(self.payload),
            resends=self.resends,
        )


class Counts(Protocol):
    """Where the uplink counts what it sent (a client's report)."""

    bytes_up: int
    rejected: int
    failed: int
    resent: int


class Uplink:
    """Publishes as ``identity``; ``installed`` says which deployed model the device runs (for
    its hello), ``deploys`` whether it installs deployments; ``counts`` hears what was sent."""

    def __init__(
        self,
        transport: Transport,
        identity: Identity,
        *,
        counts: Counts,
        installed: Callable[[], str | None],
        deploys: bool,
        resend_after: float | None = None,
    ) -> None:
        self.transport = transport
        self.identity = identity
        self.topics = Topics(identity.run)
        self.counts = counts
        self.installed = installed
        self.deploys = deploys
        self.resend_after = resend_after
        self.pending: Pending | None = None  # the last update, until its notice arrives

    def hello(self) -> None:
        """Publish the hello, retained: what the device is, runs, and resends."""
        pending = self.pending
        claim = pending.claim() if pending is not None and pending.resends else None
        topic, payload = self.identity.hello(
            self.installed(), deploys=self.deploys, unanswered=claim
        )
        self.transport.publish(topic, payload, retain=True)

    def update(self, round_: int, session: str, payload: bytes) -> int:
        """Send an update payload, kept until its notice arrives; the bytes put on the wire."""
        self.pending = Pending(
            round=round_, session=session, payload=payload, sent_at=time.monotonic()
        )
        return self.send(round_, session, payload)

    def forget(self) -> None:
        """A new coordinator session: the pending update is of a session that is gone."""
        self.pending = None

    def send(self, round_: int, session: str, payload: bytes) -> int:
        """Publish an update payload, answering coordinator session ``session``, in chunks;
        returns the bytes put on the wire."""
        prefix = self.topics.update(self.identity.client_id, round_)
        sent = 0
        for chunk in split_to_fit(payload, max_payload=self.transport.max_payload):
            body = self.identity.encode(chunk, session)
            self.transport.publish(f"{prefix}/{chunk.index}", body)
            sent += len(body)
        if not self.transport.flush(timeout=30):
            log.warning(
                "round %d: the broker has not acknowledged the update yet; it will be"
                " resent after a reconnect",
                round_,
            )
        self.counts.bytes_up += sent
        return sent

    def failed(self, round_: int, session: str, reason: str) -> None:
        """Tell the coordinator this round's training failed, so that it does not wait for it."""
        self.counts.failed += 1
        message = Failed(round=round_, reason=reason[:500])
        topic = f"{self.topics.update(self.identity.client_id, round_)}/failed"
        self.transport.publish(topic, self.identity.encode(message, session))

    def on_notice(self, notice: Notice) -> None:
        """The coordinator's answer: the pending update of its round is no longer pending."""
        pending = self.pending
        if pending is not None and pending.round == notice.round:
            self.pending = None
            if pending.resends:
                self.hello()  # no longer unanswered
        if not notice.accepted:
            self.counts.rejected += 1
            log.warning("round %d: update rejected (%s)", notice.round, notice.reason)

    def coordinator_back(self, gone_since: float) -> None:
        """The coordinator is back after being away since ``gone_since`` (monotonic): that time
        does not count towards a resend (its session on the broker kept what was sent)."""
        pending = self.pending
        if pending is not None:
            pending.sent_at += time.monotonic() - max(gone_since, pending.sent_at)

    def maybe_resend(self, round_: Round | None, *, open_: bool, reconnected: bool) -> None:
        """Send the pending update again when its notice has not come :func:`resend_wait`
        seconds after it was sent, or at once when this device's connection came back, while
        its round (``round_``, still ``open_``) lasts: a delivery lost on the way costs a
        resend, not the update. The coordinator drops a copy it has by its SHA-256 and answers
        it again. A resend for want of a notice is said in the hello."""
        pending = self.pending
        if pending is None or round_ is None or round_.round != pending.round or not open_:
            return
        waited = time.monotonic() - pending.sent_at
        if reconnected:
            log.info("round %d: resending the update after a reconnect", pending.round)
        elif waited >= resend_wait(round_, pending.resends, self.resend_after):
            pending.resends += 1
            log.warning(
                "round %d: no answer from the coordinator %.0f s after the update was"
                " sent; sending it again (resend %d)",
                pending.round,
                waited,
                pending.resends,
            )
            self.hello()
        else:
            return
        self.counts.resent += 1
        self.send(pending.round, pending.session, pending.payload)
        pending.sent_at = time.monotonic()
