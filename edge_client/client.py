"""The edge client's round loop: announce, receive the global model, train, send a sparse update.

Everything arrives on one queue and is handled on one thread. The round announcement and the model
chunks are retained on the broker, so a client that reconnects (or starts late) receives the current
round again and rejoins it if the deadline has not passed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedprune.edge_client.artifact import ArtifactStore
from fedprune.edge_client.data import LocalData
from fedprune.edge_client.deploy import DeploymentReceiver, DeployResult
from fedprune.edge_client.download import ModelDownload
from fedprune.edge_client.local_training import LocalTraining
from fedprune.edge_client.run_follower import ClientStats, RunFollower, Unable
from fedprune.edge_client.uplink import Identity, Uplink
from fedprune.protocol.chunks import MAX_ASSEMBLED_BYTES
from fedprune.protocol.codec import Model, decode_model
from fedprune.protocol.envelope import UNSIGNED
from fedprune.protocol.errors import ConfigError, WireError
from fedprune.protocol.messages import (
    Chunk,
    Deployment,
    Notice,
    Offline,
    Round,
    Spec,
    Status,
    architecture,
)
from fedprune.protocol.signing import Trust
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import ConnectionChange, Transport

if TYPE_CHECKING:
    from fedprune.device_profiles import DeviceProfile

log = logging.getLogger("fedprune.client")

WAIT_REPORT_SECONDS = 30.0  # how often a client that still waits says so again


@dataclass(frozen=True, kw_only=True)
class Seen:
    """A round announcement, and when this device first saw it (its own monotonic clock)."""

    round: int
    at: float


def time_left(round_: Round, seen: Seen | None) -> float:
    """Seconds left in ``round_`` by this device's own monotonic clock, counted from when it
    first saw the announcement (``seen``); a coordinator older than protocol 1.5 sends no
    duration, and then its deadline is compared with this device's wall clock."""
    if round_.duration <= 0 or seen is None:
        return round_.deadline - time.time()
    return seen.at + round_.duration - time.monotonic()


@dataclass(kw_only=True)
class Waiting:
    """What keeps the device from training, since when, and when the log last said so."""

    what: str
    since: float
    said: float


class EdgeClient:
    def __init__(
        self,
        transport: Transport,
        *,
        identity: Identity,
        data: LocalData,
        local_epochs: int | None = None,
        seed: int = 0,
        deploy: DeploymentReceiver | None = None,
        deploy_wait: float = 60.0,
        cache: Path | None = None,
        wait_report: float = WAIT_REPORT_SECONDS,
        trust: Trust = UNSIGNED,
        show: Callable[[str], None] | None = None,
        profile: DeviceProfile | None = None,
        resend_after: float | None = None,
        remind: Callable[[], None] | None = None,
    ) -> None:
        """``deploy`` installs the model deployed to this client's profile at the end of the run;
        the client then waits up to ``deploy_wait`` seconds for it before it exits. While it
        cannot train, the client logs what it waits for when that changes, and again every
        ``wait_report`` seconds. ``trust`` holds the coordinator's verify key: with it, every
        message that is not signed by the coordinator is dropped, counted and logged. ``show``
        hears what the client is doing in a few words whenever that changes (a live line).
        ``profile`` bounds the work: its local epochs and batch size where they are smaller than
        the run's, and its memory: no model over a quarter of it is assembled. An update with no
        notice from the coordinator ``resend_after`` seconds after it was sent (by default half
        the round, at least a minute: :func:`resend_wait`) is sent again, then after twice as
        long, and so on while its round lasts. ``remind`` is called every turn of the loop (a
        ``Reminder`` of an exposed broker)."""
        self.profile = profile
        self.trust = trust
        self.show = show
        self._shown = ""
        self.transport = transport
        self.deploy = deploy
        self.training = LocalTraining(
            identity.backend,
            data,
            profile=profile,
            local_epochs=local_epochs,
            seed=seed,
            residual_file=None if cache is None else cache / f"residual-{identity.client_id}.npz",
            run=identity.run,
            control_file=None if cache is None else cache / f"control-{identity.client_id}.npz",
            show=self._show_state,
        )
        self.artifacts = ArtifactStore(cache) if self.training.needs_artifact else None
        self.identity = identity
        self.topics = Topics(identity.run)
        self.client_id = identity.client_id
        self.data = data
        self.stats = ClientStats()
        self._spec: Spec | None = None
        self._round: Round | None = None
        self._round_seen: Seen | None = None  # the round announced, and when (monotonic)
        self._out_of_time: int | None = None  # the round whose running out was said
        self.uplink = Uplink(
            transport,
            identity,
            counts=self.stats,
            installed=lambda: None if deploy is None else deploy.installed_sha256,
            deploys=deploy is not None,
            resend_after=resend_after,
        )
        assemble = MAX_ASSEMBLED_BYTES if profile is None else profile.memory_mb * 2**20 // 4
        self.download = ModelDownload(
            transport, self.topics, max_size=min(MAX_ASSEMBLED_BYTES, assemble)
        )
        self._deploy_prefix = self.topics.deploy(identity.profile)
        self.following = RunFollower(
            identity.run,
            identity.profile,
            self.stats,
            deploy=deploy,
            deploy_wait=deploy_wait,
            on_new_session=self._new_session,
            trust=trust,
            max_payload=identity.max_payload,
        )
        self._forever = False
        self._trained: set[int] = set()  # rounds trained in the session followed
        self.wait_report = wait_report
        self.remind = remind or (lambda: None)
        self._waiting: Waiting | None = None  # what it waits for, since when, last said

    def start(self) -> None:
        t = self.topics
        patterns = [t.spec, t.round, t.status, t.inbox(self.client_id)]
        if self.deploy is not None:
            patterns.append(f"{self._deploy_prefix}/#")
        if self.artifacts is not None:
            patterns.append(f"{t.artifact}/+")
        for pattern in patterns:
            self.transport.subscribe(pattern)
        self.uplink.hello()

    def run(
        self,
        *,
        timeout: float | None = None,
        forever: bool = False,
        stop: threading.Event | None = None,
    ) -> ClientStats:
        """Serve rounds until the coordinator finishes (or ``timeout`` seconds pass, or ``stop``
        is set); with ``forever``, serve every later run of the same name too (a device as a
        service): a run this device cannot train is then answered with a failed round each
        round, not an exit."""
        self._forever = forever
        self.start()
        end = None if timeout is None else time.monotonic() + timeout
        stop = stop or threading.Event()
        while (
            not self.stats.finished
            and not stop.is_set()
            and (end is None or time.monotonic() < end)
        ):
            self.step(self.transport.get(timeout=0.5))
        return self.stats

    def step(self, item: tuple[str, bytes] | None) -> None:
        """One turn of the loop: handle ``item`` (a message, if one came), then train, resend,
        end the run or say what it waits for, as is due."""
        if item is not None:
            self.stats.bytes_down += len(item[1])
            self.handle(*item)
        self._maybe_train()
        self._maybe_resend()
        self.following.check_finished()
        if self._forever and self.stats.finished:
            self.following.next_run()
        self._report_waiting()
        self._show_state()
        self.remind()

    def _show_state(self, doing: str | None = None) -> None:
        """Tell ``show`` what the client is doing (``doing``, else what it waits for)."""
        if self.show is None:
            return
        done = self.stats.rounds
        text = doing or f"waiting for {self.waiting_for() or 'the coordinator'}"
        if done and doing is None:
            text = f"{len(done)} round(s) done, {self.stats.bytes_up:,} bytes sent; {text}"
        if text != self._shown:
            self.show(text)
            self._shown = text

    def waiting_for(self) -> str | None:
        """What keeps this client from training now, in words; ``None`` when nothing does."""
        run, round_, spec, following = self.topics.run, self._round, self._spec, self.following
        if following.finished_at is not None:
            deploy = following.waits_for_deployment()
            return f"the model deployed to profile {self.identity.profile}" if deploy else None
        if following.away_since:
            return f"the coordinator of run {run!r} to come back (its connection dropped)"
        status = following.status
        if status is None and spec is None:
            return f"the coordinator of run {run!r} (nothing from it on the broker yet)"
        if spec is None or round_ is None:
            phase = "" if status is None else f" (coordinator {status.phase})"
            return f"run {run!r} to start its first round{phase}"
        if self.artifacts is not None and spec.artifact is not None and not self._artifact(spec):
            return f"the training artifact ({spec.artifact.size:,} bytes)"
        if (why := self._cannot_train(spec)) is not None:
            return f"a run this device can train ({why})"
        if round_.round in self._trained:
            return f"the round after round {round_.round}"
        if not round_.selects(self.client_id):
            return f"a round that selects this device (round {round_.round} does not)"
        if time_left(round_, self._round_seen) <= 0:
            return f"the next round (round {round_.round}'s time ran out)"
        if self.download.model(round_) is None:
            return f"round {round_.round}'s model ({round_.model.size:,} bytes)"
        if round_.control is not None and self.download.control(round_) is None:
            return f"round {round_.round}'s control variate ({round_.control.size:,} bytes)"
        return None

    def _report_waiting(self) -> None:
        """Say what the client waits for when that changes, and again while it lasts."""
        what, now = self.waiting_for(), time.monotonic()
        if what is None:
            self._waiting = None
        elif self._waiting is None or self._waiting.what != what:
            log.info("waiting for %s", what)
            self._waiting = Waiting(what=what, since=now, said=now)
        elif now - self._waiting.said >= self.wait_report:
            log.info("still waiting for %s (%.0f s)", what, now - self._waiting.since)
            self._waiting.said = now

    def _on_spec(self, spec: Spec) -> None:
        self._spec = spec
        if (why := self._cannot_train(spec)) is not None and not self._forever:
            raise ConfigError(why)

    def _cannot_train(self, spec: Spec) -> str | None:
        """Why this device cannot train the run it follows, or ``None``."""
        return self.training.cannot_train(spec, self.topics.run) or self.following.cannot_train()

    def handle(self, topic: str, payload: bytes) -> None:
        """One message from the coordinator (only it may send on the topics a device reads)."""
        message = self.following.receive(topic, payload)
        try:
            if isinstance(message, Chunk):
                self._on_chunk(topic, message)
            elif isinstance(message, Round):
                self._on_round(message)
            elif isinstance(message, Status):
                self._on_status(message)
            elif isinstance(message, Spec):
                self._on_spec(message)
            elif isinstance(message, Deployment) and self.deploy is not None:
                self._installed(self.deploy.on_deployment(message))
            elif isinstance(message, Offline) and topic == self.topics.status:
                self.following.on_offline()
            elif isinstance(message, Notice):
                self.uplink.on_notice(message)
        except WireError as exc:  # a chunk that does not belong, a model that does not decode
            log.warning("ignored a message on %s: %s", topic, exc)

    def _on_chunk(self, topic: str, chunk: Chunk) -> None:
        """A chunk of the training artifact, of a deployment, or of a round's model."""
        if topic.startswith(self.topics.artifact):
            if self.artifacts is not None:
                self.artifacts.on_chunk(chunk)
        elif topic.startswith(self._deploy_prefix):
            if self.deploy is not None:
                self._installed(self.deploy.on_chunk(chunk))
        else:
            self.download.on_chunk(topic, chunk, self._round)

    def _on_round(self, round_: Round) -> None:
        if self._round_seen is None or self._round_seen.round != round_.round:
            self._round_seen = Seen(round=round_.round, at=time.monotonic())
        self._round = round_
        self._fetch_model(round_)

    def _new_session(self) -> None:
        """The coordinator started a new session: its round numbers start over."""
        self._trained.clear()
        self._round = self._round_seen = self._out_of_time = None
        self.uplink.forget()

    def _on_status(self, status: Status) -> None:
        if (away_since := self.following.on_status(status)) is not None:
            self.uplink.coordinator_back(away_since)

    def _installed(self, result: DeployResult | None) -> None:
        """Tell the coordinator (in a new hello) which model this device now runs."""
        if result is not None and result.saved:
            self.uplink.hello()

    def _fetch_model(self, round_: Round) -> None:
        """Subscribe to the round's model when the round selects this device (and only then: an
        unselected device downloads nothing), instead of the previous round's."""
        if not round_.selects(self.client_id) or round_.round in self._trained:
            return
        if (why := self.download.too_big(round_)) is not None:
            self._fail(round_.round, why)
        else:
            self.download.fetch(round_)

    def _fail(self, round_: int, why: str) -> None:
        """This device cannot train ``round_``: it says why to the coordinator (a failed round)."""
        self._trained.add(round_)
        log.error("round %d: %s; told the coordinator", round_, why)
        self.uplink.failed(round_, self.following.session or "", why)

    def _maybe_resend(self) -> None:
        """Send the pending update again if its notice is overdue, or at once after this
        device's own reconnect, while its round lasts (uplink.Uplink.maybe_resend); not while
        the coordinator's last will says it is away (its session keeps what was sent)."""
        reconnected = any(
            e.change is ConnectionChange.RESTORED for e in self.transport.connection_events()
        )
        round_ = self._round
        open_ = round_ is not None and time_left(round_, self._round_seen) > 0
        away = self.following.away_since is not None and not reconnected
        self.uplink.maybe_resend(round_, open_=open_ and not away, reconnected=reconnected)

    def _maybe_train(self) -> None:
        round_, spec = self._round, self._spec
        if round_ is None or spec is None or round_.round in self._trained:
            return
        if not round_.selects(self.client_id):
            return
        if time_left(round_, self._round_seen) <= 0:
            if self._out_of_time != round_.round:
                self._out_of_time = round_.round
                log.warning(
                    "round %d: its time ran out before this device could train (the"
                    " round lasts %.0f s)",
                    round_.round,
                    round_.duration,
                )
            return
        if (why := self._cannot_train(spec)) is not None:  # only when serving forever
            self._fail(round_.round, why)
            return
        payload, control = self.download.model(round_), self.download.control(round_)
        if payload is None or (round_.control is not None and control is None):
            return
        if round_.architecture and round_.architecture != architecture(spec.model_json):
            return  # the model was rebuilt: its Spec (retained) is on its way
        artifact = self._artifact(spec)
        if self.artifacts is not None and artifact is None:
            return
        self.stats.rounds.append(round_.round)
        self._trained.add(round_.round)
        try:
            model = decode_model(payload)
            c = None if control is None else decode_model(control)
        except WireError as exc:
            log.warning(
                "round %d: the global model or its control variate cannot be decoded (%s)",
                round_.round,
                exc,
            )
            return
        try:
            self.train_round(round_, spec, model, artifact, c)
        except ConfigError as exc:  # this device cannot take part (its labels, its trainer)
            if not self._forever:
                raise  # it says so and stops
            self.following.unable = Unable(session=self.following.session, why=str(exc))
            log.error("round %d: %s; waiting for the next run (--forever)", round_.round, exc)
            self.uplink.failed(round_.round, self.following.session or "", str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed round is data, not the device's end
            log.exception("round %d: training failed", round_.round)
            self.uplink.failed(
                round_.round, self.following.session or "", f"{type(exc).__name__}: {exc}"
            )

    def _artifact(self, spec: Spec) -> bytes | None:
        """The training artifact this client's backend needs, once it is here."""
        if self.artifacts is None or spec.artifact is None:
            return None
        return self.artifacts.get(spec.artifact)

    def train_round(
        self,
        round_: Round,
        spec: Spec,
        model: Model,
        artifact: bytes | None = None,
        control: Model | None = None,
    ) -> None:
        """Train ``round_`` on the local data (a SCAFFOLD round with its ``control`` variate)
        and send the update."""
        session = self.following.session or ""
        trained = self.training.train(round_, spec, model, artifact, session, control)
        sent = self.uplink.update(round_.round, session, trained.payload)
        metrics = trained.update.metrics
        log.info(
            "round %d: trained %d epoch(s) on %d samples in %.3f s, held-out %s, sent %d bytes",
            round_.round,
            trained.epochs,
            self.data.num_samples,
            metrics["train_seconds"],
            trained.evaluation.describe(),
            sent,
        )
