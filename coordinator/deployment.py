"""Deploying the exported models after the rounds: each profile's export goes to the online
devices that announced it, and the coordinator waits for those that install deployments to say
they run it."""

from __future__ import annotations

import time
from collections.abc import Callable

from fedprune.coordinator.downlink import Downlink
from fedprune.coordinator.fleet import Fleet
from fedprune.coordinator.observer import Observer


class Deployments:
    """Publishes exports through ``downlink`` to the devices in ``fleet``; ``pump`` handles the
    coordinator's messages (the hellos that confirm an install) while it waits."""

    def __init__(
        self, fleet: Fleet, downlink: Downlink, observer: Observer, pump: Callable[[float], bool]
    ) -> None:
        self.fleet = fleet
        self.downlink = downlink
        self.observer = observer
        self.pump = pump

    def publish(
        self,
        profile: str,
        model: bytes,
        *,
        precision: str,
        accuracy: float | None,
        export_json: str,
    ) -> str:
        """Publish an exported model to the devices of one profile; its SHA-256, which a device's
        hello names once it installed it."""
        devices = self.fleet.of_profile(profile)
        manifest = self.downlink.deploy(
            profile,
            model,
            devices,
            limit=self.fleet.fit(devices),
            precision=precision,
            accuracy=accuracy,
            export_json=export_json,
        )
        self.observer.deployed(profile, manifest.sha256, accuracy)
        return manifest.sha256

    def await_installs(self, deployed: dict[str, str], timeout: float) -> list[str]:
        """Give the online devices of each deployed profile (``deployed``: profile -> SHA-256)
        that install deployments up to ``timeout`` seconds to say they run the new model; those
        that have not, by id."""
        end = time.monotonic() + timeout
        while self.fleet.not_installed(deployed) and time.monotonic() < end:
            self.pump(0.1)
        return self.fleet.not_installed(deployed)
