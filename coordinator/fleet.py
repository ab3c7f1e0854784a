"""The devices a coordinator knows: who is online, what each can train and encode, who is drawn.

A device is known by its hello (retained on its status topic) until its last will says it went
offline. :meth:`Fleet.select` draws a round's devices by the run's seed and the round, so that a
resumed run draws as the uninterrupted one would have, and every device can tell from the round
message alone whether it is drawn (``Round.draw`` and ``cutoff``, protocol 1.6).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fedprune import device_profiles
from fedprune.device_profiles import DEFAULT_PROFILE
from fedprune.edge_client.trainer import backend_class
from fedprune.protocol.codec import Codec
from fedprune.protocol.envelope import receive
from fedprune.protocol.errors import ConfigError, SignatureError, WireError
from fedprune.protocol.messages import EVERYONE, Hello, Offline, rank
from fedprune.protocol.signing import Trust
from fedprune.protocol.topics import NAME, check_name

log = logging.getLogger("fedprune.coordinator")

MIN_PAYLOAD = 16 * 1024
"""The smallest message limit a device may ask for (a smaller one would cut models to crumbs)."""


@dataclass(frozen=True, kw_only=True)
class Change:
    """What a device's status message changed: a hello (``joined`` when it was not online), or
    its going offline."""

    client_id: str
    hello: Hello | None = None
    joined: bool = False


@dataclass(frozen=True, kw_only=True)
class Draw:
    """A round's selection: its draw and cutoff (what the round message carries) and the devices
    online that it selects."""

    draw: str
    cutoff: int
    selected: list[str]


class Fleet:
    """The devices online, by id, with what they announced."""

    def __init__(
        self,
        *,
        seed: int,
        clients_per_round: int,
        max_payload: int,
        codec: Codec | None,
        rules: frozenset[str] = frozenset(),
    ) -> None:
        self.seed = seed
        self.rules = rules  # the local training rules a device must follow (Hello.training)
        self.clients_per_round = clients_per_round
        self.max_payload = max_payload
        self.codec = codec  # the run's (None: each device picks its own)
        self.devices: dict[str, Hello] = {}
        # The profile each device announced -> the catalogue profile exported for it; a name from
        # the network is only ever looked up in the catalogue, never opened as a path.
        self.profiles: dict[str, str] = {}
        self.artifact_error: str | None = None  # why litert devices cannot train, if they cannot
        self.left_at = -math.inf  # when a device last went offline (monotonic)
        self.dropped = 0  # status messages refused for a missing or bad signature
        self.turned_away: dict[str, str] = {}  # devices that joined unable to train it: why

    def __contains__(self, client_id: object) -> bool:
        return client_id in self.devices

    def __len__(self) -> int:
        return len(self.devices)

    def __iter__(self) -> Iterator[str]:
        return iter(self.devices)

    def on_status(
        self, client_id: str, payload: bytes, trust: Trust, *, run: str | None = None
    ) -> Change | None:
        """A message on ``client_id``'s status topic, which only that device may send, for run
        ``run``: its hello or its last will. ``None`` when it changes nothing (a forged,
        replayed, garbled or cleared one)."""
        if not payload or not NAME.fullmatch(client_id):
            return None
        try:
            message = receive(payload, trust, sender=client_id, run=run).message
        except SignatureError as exc:
            self.dropped += 1
            log.warning("dropped a status message on %s's topic: %s", client_id, exc)
            return None
        except WireError as exc:
            log.warning("ignored a status message on %s's topic: %s", client_id, exc)
            return None
        if isinstance(message, Hello) and message.client_id != client_id:
            log.warning(
                "ignored a hello for %r on %s's status topic", message.client_id[:64], client_id
            )
        elif isinstance(message, Hello):
            return Change(client_id=client_id, hello=message, joined=self.hello(message))
        elif isinstance(message, Offline) and self.offline(client_id):
            return Change(client_id=client_id)
        return None

    def hello(self, hello: Hello) -> bool:
        """Take a device's hello; whether it joined (was not online before)."""
        client_id = hello.client_id
        joined = client_id not in self.devices
        if joined:
            why = None if self.can_train(hello) else self.why_not(hello)
            if why is not None:
                self.turned_away[client_id] = why
            log.info(
                "client %s joined (%s, %d samples, %s trainer)%s",
                client_id,
                hello.profile,
                hello.num_samples,
                hello.backend,
                "" if why is None else f": {why}",
            )
            exported = catalogue_profile(client_id, hello.profile)
            if exported is not None:
                self.profiles[hello.profile] = exported
        self.devices[client_id] = hello
        return joined

    def offline(self, client_id: str) -> bool:
        """A device's last will: whether it was online."""
        if self.devices.pop(client_id, None) is None:
            return False
        self.left_at = time.monotonic()
        log.info("client %s went offline", client_id)
        return True

    def cannot_follow(self, hello: Hello) -> str | None:
        """Why a device cannot send updates in the run's codec or train by the run's rules
        (``rules``: FedProx, a learning-rate schedule); ``None``: it can."""
        if lacking := self.rules.difference(hello.training):
            return (
                f"this run trains with {', '.join(sorted(lacking))}, which this device (protocol"
                " older than 1.13) does not follow: it is not selected"
            )
        if self.codec is None:
            return None
        missing = self.codec.features() - set(hello.codecs)
        if not missing:
            return None
        return (
            f"this run's codec {self.codec.name} needs {', '.join(sorted(missing))}, which this"
            " device lacks: it is not selected"
        )

    def can_train(self, hello: Hello) -> bool:
        """Devices whose trainer needs the artifact cannot train when it could not be built, nor
        devices that cannot use the run's codec."""
        if self.cannot_follow(hello):
            return False
        return self.artifact_error is None or not needs_artifact(hello.backend)

    def why_none_can_train(self) -> str:
        """Why no online device can train this run (there are some online)."""
        return self.why_not(next(iter(self.devices.values())))

    def why_not(self, hello: Hello) -> str:
        """Why a device that cannot train this run cannot."""
        return self.cannot_follow(hello) or (
            f"its trainer ({hello.backend}) needs a TFLite training artifact, and this model has"
            f" none: {self.artifact_error}"
        )

    def turned_away_why(self) -> str:
        """The devices that joined unable to train this run, and why (empty: none did)."""
        if not self.turned_away:
            return ""
        return (
            f"; {len(self.turned_away)} device(s) joined that cannot train it"
            f" ({', '.join(sorted(self.turned_away)[:5])}): {min(self.turned_away.values())}"
        )

    def select(self, round_: int) -> Draw:
        """The round's draw, its cutoff and the online devices that can train it selects: all
        of them, or the ``clients_per_round`` of lowest rank. The draw is seeded by the run's
        seed and the round, so a resumed run selects as the uninterrupted one would have."""
        draw = f"{random.Random(f'{self.seed}/{round_}').getrandbits(64):016x}"
        online = sorted(
            (rank(draw, c), c) for c, hello in self.devices.items() if self.can_train(hello)
        )
        k = self.clients_per_round
        if k <= 0 or k >= len(online):
            return Draw(draw=draw, cutoff=EVERYONE, selected=sorted(c for _, c in online))
        return Draw(draw=draw, cutoff=online[k - 1][0], selected=sorted(c for _, c in online[:k]))

    def fit(self, devices: Iterable[Hello]) -> int:
        """The largest message every one of ``devices`` takes: the run's ``max_payload``, or the
        smallest limit they announced (never under :data:`MIN_PAYLOAD`)."""
        limits = [max(MIN_PAYLOAD, h.max_payload) for h in devices if h.max_payload]
        return min([self.max_payload, *limits])

    def fit_ids(self, client_ids: Iterable[str]) -> int:
        """:meth:`fit` for the devices of these ids that are online."""
        return self.fit(self.devices[c] for c in client_ids if c in self.devices)

    def of_profile(self, profile: str) -> list[Hello]:
        """The online devices of ``profile`` that install deployed models."""
        return [h for h in self.devices.values() if h.deploys and h.profile == profile]

    def not_installed(self, deployed: dict[str, str]) -> list[str]:
        """The online devices of the deployed profiles (``deployed``: profile -> SHA-256) that
        install deployments and do not yet say they run the new model, by id."""
        return sorted(
            client_id
            for client_id, hello in self.devices.items()
            if hello.deploys
            and hello.profile in deployed
            and hello.installed != deployed[hello.profile]
        )

    def needing_artifact(self) -> int:
        """How many online devices train with the artifact (they all receive it)."""
        return sum(1 for h in self.devices.values() if needs_artifact(h.backend))


def catalogue_profile(client_id: str, announced: str) -> str | None:
    """The shipped profile whose export a device that announced ``announced`` gets: that one if
    it is in the catalogue, else the default one; ``None`` for a name that cannot name a topic."""
    try:
        check_name(announced, "profile")
    except ConfigError:
        log.warning(
            "client %s announced an unusable profile name %r: no deployment for it",
            client_id,
            announced[:64],
        )
        return None
    if announced in device_profiles.available():
        return announced
    log.warning(
        "client %s announced profile %r, which is not in the catalogue: it gets the %s export",
        client_id,
        announced,
        DEFAULT_PROFILE,
    )
    return DEFAULT_PROFILE


@functools.cache
def smallest_catalogue_payload() -> int:
    """The smallest message limit of the shipped profiles."""
    return min(device_profiles.load(name).max_payload_bytes for name in device_profiles.available())


def needs_artifact(backend: str) -> bool:
    """Whether a device of this trainer backend trains with the TFLite training artifact."""
    try:
        return backend_class(backend).needs_artifact
    except ConfigError:  # a backend this side does not know: nothing to build for it
        return False
