"""The coordinator's run as a device follows it, apart from its rounds: which of the coordinator's
messages belong to it (signed by the coordinator, made for this run and the coordinator session
followed: a newer session is joined, an older one is a replay), the run's phase from its status,
whether the coordinator's last will says it is away, and the run's end, with the deployed model
the device waits for before it exits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedprune.edge_client.deploy import DeploymentReceiver
from fedprune.protocol.envelope import UNSIGNED, receive
from fedprune.protocol.errors import ReplayError, SignatureError, WireError
from fedprune.protocol.messages import COORDINATOR, Message, Phase, Status
from fedprune.protocol.signing import Trust

log = logging.getLogger("fedprune.client")


@dataclass(kw_only=True)
class ClientStats:
    rounds: list[int] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0  # payload bytes of every message the broker delivered
    rejected: int = 0
    finished: bool = False
    aborted: bool = False
    dropped: int = 0  # messages refused for a missing or bad signature
    replayed: int = 0  # messages made for another run or an earlier coordinator session
    oversize: int = 0  # messages over the profile's payload limit, ignored
    failed: int = 0  # rounds whose training raised (reported to the coordinator)
    resent: int = 0  # updates sent again for want of a notice (or after a reconnect)


@dataclass(frozen=True, kw_only=True)
class Unable:
    """A coordinator session this device cannot train, and why (it serves it failed rounds)."""

    session: str | None
    why: str


class RunFollower:
    """Follows run ``run`` for a device of profile ``profile``, ending it in ``stats``: it takes
    the coordinator's messages that belong to the run (signed with the key in ``trust``, no
    larger than ``max_payload``). A newer coordinator session calls ``on_new_session`` (the
    device forgets that run's rounds). With ``deploy``, the end of a run that deploys to this
    profile waits up to ``deploy_wait`` seconds for the model."""

    def __init__(
        self,
        run: str,
        profile: str,
        stats: ClientStats,
        *,
        deploy: DeploymentReceiver | None,
        deploy_wait: float,
        on_new_session: Callable[[], None],
        trust: Trust = UNSIGNED,
        max_payload: int = 0,
    ) -> None:
        self.run = run
        self.profile = profile
        self.stats = stats
        self.deploy = deploy
        self.deploy_wait = deploy_wait
        self.on_new_session = on_new_session
        self.trust = trust  # the coordinator's verify key (or unsigned)
        self.max_payload = max_payload  # the largest message the device takes (0: any)
        self.session: str | None = None  # the coordinator session it follows (protocol 1.5)
        self.status: Status | None = None  # the coordinator's last
        self.away_since: float | None = None  # since when its last will says it is away
        self.unable: Unable | None = None  # a session this device cannot train, and why
        self.finished_at: float | None = None  # when the coordinator said it finished
        self.awaiting_deploy = False  # the finished run deploys to this device's profile
        self._live = False  # saw this run waiting or training (so a FINISHED is about it)
        self._ended: str | None = None  # the session whose end was served (``forever``)

    def receive(self, topic: str, payload: bytes) -> Message | None:
        """The coordinator's message in ``payload``; ``None`` (counted and logged) when it is
        empty (a cleared retained message), over the profile's payload limit, unreadable, not
        signed by the coordinator, or made for another run or an earlier coordinator session."""
        if not payload:
            return None
        if (limit := self.max_payload) and len(payload) > limit:
            self.stats.oversize += 1
            log.warning(
                "ignored a message of %d bytes on %s: over this profile's %d-byte limit",
                len(payload),
                topic,
                limit,
            )
            return None
        try:
            envelope = receive(payload, self.trust, sender=COORDINATOR, run=self.run)
        except ReplayError as exc:
            self.stats.replayed += 1
            log.warning("dropped a message on %s: %s", topic, exc)
            return None
        except SignatureError as exc:
            self.stats.dropped += 1
            log.warning("dropped a message on %s: %s", topic, exc)
            return None
        except WireError as exc:  # whatever arrives from the network is data, never fatal
            log.warning("ignored a message on %s: %s", topic, exc)
            return None
        # The session: in every envelope from 1.10, in the round and status messages from 1.5
        session = envelope.session or getattr(envelope.message, "session", "")
        if not self.follow(session):
            self.stats.replayed += 1
            return None
        return envelope.message

    def follow(self, session: str) -> bool:
        """Whether a message of coordinator session ``session`` is current. A newer session (a
        restart, a resumed run) is joined: this run's rounds are forgotten, so that its round
        numbers, which start over, are trained again. An older one is stale (a replay)."""
        if not session or session == self.session:
            return True
        if self.session is not None and session < self.session:
            log.warning("ignored a message of an earlier coordinator session (%s)", session[:32])
            return False
        if self.session is not None:
            log.info("the coordinator started a new session (%s): this device joins it", session)
            self.on_new_session()
            self.finished_at = None
            self.unable = None
        self.session = session
        return True

    def cannot_train(self) -> str | None:
        """Why this device cannot train the session it follows (found when it tried), or
        ``None``."""
        unable = self.unable
        return unable.why if unable is not None and unable.session == self.session else None

    def on_status(self, status: Status) -> float | None:
        """The coordinator's status; since when it was away, if its status ended that."""
        self.status = status
        back, self.away_since = self.away_since, None
        if status.session and status.session == self._ended:
            return back  # the end of a run already served, again (a reconnect)
        if status.phase in (Phase.WAITING, Phase.TRAINING):
            self._live = True
        elif status.phase is Phase.ABORTED:
            log.error("the coordinator stopped the run on an error")
            self.stats.aborted = self.stats.finished = True
        elif not (self._live or self.stats.rounds):
            # A retained FINISHED from an earlier run of the same name: wait for the next one.
            log.info("run %s has already finished; waiting for it to start again", self.run)
        else:
            self.finished_at = time.monotonic()
            self.awaiting_deploy = self.profile in status.deploy
        return back

    def on_offline(self) -> None:
        """The coordinator's last will: its connection dropped."""
        log.warning("the coordinator's connection dropped; waiting for it to come back")
        self.away_since = self.away_since or time.monotonic()

    def waits_for_deployment(self) -> bool:
        return self.awaiting_deploy and self.deploy is not None

    def check_finished(self) -> None:
        """End the run once the coordinator finished and the deployed model is here (or its
        wait is over)."""
        if self.finished_at is None:
            return
        deploy = self.deploy
        waiting = self.waits_for_deployment() and deploy is not None and not deploy.settled()
        if waiting and time.monotonic() - self.finished_at < self.deploy_wait:
            return
        if waiting:
            log.warning("the deployed model did not arrive within %.0f s", self.deploy_wait)
        self.stats.finished = True

    def next_run(self) -> None:
        """The run ended (finished or aborted): wait for the coordinator's next session."""
        log.info(
            "run %r %s; waiting for its next start (--forever)",
            self.run,
            "stopped" if self.stats.aborted else "finished",
        )
        self.stats.finished = self.stats.aborted = False
        self.finished_at = None
        self._live = self.awaiting_deploy = False
        self._ended = self.session
