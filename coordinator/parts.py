"""The parts a round loop is given (:class:`~fedprune.coordinator.rounds.Coordinator`), made for
one run by :meth:`Parts.build`: the publisher and its byte counts, the telemetry and the observers
beside it, the device registry, the Spec, the update intake and, with aggregators, their partial
sums. A test or another deployment builds them differently; the loop only orders their steps."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedprune.coordinator.aggregator import PartialSums
from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.downlink import Downlink
from fedprune.coordinator.fleet import Fleet
from fedprune.coordinator.global_model import GlobalModel
from fedprune.coordinator.intake import UpdateIntake
from fedprune.coordinator.keys import DeviceKeys
from fedprune.coordinator.observer import Observer, Observers
from fedprune.coordinator.spec import SpecPublisher
from fedprune.coordinator.telemetry import Telemetry, new_session, publisher
from fedprune.coordinator.validation import Limits
from fedprune.protocol.codec import Codec
from fedprune.protocol.messages import COORDINATOR
from fedprune.protocol.signing import SigningKey, Trust
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import Transport


@dataclass(frozen=True, kw_only=True)
class Parts:
    transport: Transport
    config: RunConfig
    topics: Topics
    codec: Codec | None  # the run's, or None: each device picks by its profile
    downlink: Downlink
    telemetry: Telemetry
    observer: Observers  # the telemetry and the observers given
    fleet: Fleet
    spec: SpecPublisher
    intake: UpdateIntake
    partials: PartialSums | None  # with aggregators
    keys: DeviceKeys | None = None  # the devices' verify keys, read again when they change

    @classmethod
    def build(
        cls,
        transport: Transport,
        config: RunConfig,
        model: GlobalModel,
        *,
        limits: Limits | None = None,
        build_artifact: Callable[[], bytes] | None = None,
        signer: SigningKey | None = None,
        trust: Trust | None = None,
        keys: DeviceKeys | None = None,
        observers: list[Observer] | None = None,
    ) -> Parts:
        """The parts of a run of ``config`` on ``transport``. ``build_artifact`` makes the
        trainable TFLite artifact that ``litert`` clients train with (spec.SpecPublisher);
        ``signer`` signs what the coordinator publishes and ``trust`` holds the devices' keys
        (``keys``: as read from their folder, and again when it changes);
        ``observers`` hear what happens, next to the telemetry (which monitors read on the
        broker)."""
        topics = Topics(config.run)
        codec = None if config.codec == "auto" else Codec.parse(config.codec)
        session = new_session(time.time())
        downlink = Downlink(transport, topics, signer=signer, session=session)
        publish = publisher(transport, topics.telemetry, downlink.encode)
        telemetry = Telemetry(config, publish=publish, signed=signer is not None, session=session)
        observer = Observers(telemetry, *(observers or []))
        fleet = Fleet(
            seed=config.seed,
            clients_per_round=config.clients_per_round,
            max_payload=config.max_payload,
            codec=codec,
            rules=config.training_rules,
        )
        spec = SpecPublisher(
            config,
            model,
            downlink=downlink,
            fleet=fleet,
            codec=codec,
            build_artifact=build_artifact,
        )
        intake = UpdateIntake(
            fleet=fleet,
            trust=keys.trust if keys is not None else trust or Trust(),
            # SCAFFOLD's updates carry their control change: validation asks for it
            limits=dataclasses.replace(limits or Limits(), control=config.scaffold),
            codec=codec,
            clients_per_round=config.clients_per_round,
            staleness_weight=config.staleness_weight,
            observer=observer,
            notify=downlink.notify,
            run=config.run,
            session=session,
            weight_cap=config.weight_cap,
        )
        own = Trust() if signer is None else Trust.of({COORDINATOR: signer.verify_key})
        partials = (
            PartialSums(topics, own, expected=config.aggregators, session=session)
            if config.aggregators
            else None
        )
        return cls(
            transport=transport,
            config=config,
            topics=topics,
            codec=codec,
            downlink=downlink,
            telemetry=telemetry,
            observer=observer,
            fleet=fleet,
            spec=spec,
            intake=intake,
            partials=partials,
            keys=keys,
        )
