"""The MQTT topic tree of one run: ``fedprune/v<major>/<run>/...`` (see docs/protocol.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedprune.protocol.envelope import PROTOCOL_MAJOR
from fedprune.protocol.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""What a run, a device or a profile may be called: each becomes an MQTT topic level and a folder
name, so no '/', '+', '#', spaces, or a leading '.' or '-'."""


def check_name(text: str, what: str) -> str:
    """``text`` if it is a valid :data:`NAME`, else a one-line ``ConfigError`` about ``what``."""
    if not NAME.fullmatch(text):
        raise ConfigError(
            f"{what} {text!r}: use letters, digits, '.', '_' or '-', starting with a letter or"
            " digit (it names an MQTT topic level and a folder)"
        )
    return text


@dataclass(frozen=True)
class Topics:
    run: str

    @property
    def root(self) -> str:
        return f"fedprune/v{PROTOCOL_MAJOR}/{self.run}"

    @property
    def status(self) -> str:
        return f"{self.root}/coordinator/status"

    @property
    def spec(self) -> str:
        return f"{self.root}/spec"

    @property
    def artifact(self) -> str:
        """Prefix of the trainable TFLite artifact's chunks (``<prefix>/<i>``, retained)."""
        return f"{self.root}/artifact"

    @property
    def round(self) -> str:
        return f"{self.root}/round"

    @property
    def metrics(self) -> str:
        return f"{self.root}/metrics"

    @property
    def telemetry(self) -> str:
        """The retained ``Snapshot`` that monitors show."""
        return f"{self.root}/telemetry"

    @property
    def all_models(self) -> str:
        return f"{self.root}/model/+/+"

    def model(self, version: int) -> str:
        """Prefix of the chunks of one model version; chunk ``i`` is at ``<prefix>/<i>``."""
        return f"{self.root}/model/{version}"

    def delta(self, version: int) -> str:
        """Prefix of the chunks of one model version as a change to the previous one."""
        return f"{self.model(version)}/delta"

    def control(self, version: int) -> str:
        """Prefix of the chunks of a round's SCAFFOLD control variate (Round.control)."""
        return f"{self.model(version)}/control"

    def deploy(self, profile: str) -> str:
        """Retained ``Deployment`` of one profile; its chunks are under ``<this>/chunks/<i>``."""
        return f"{self.root}/deploy/{profile}"

    def client_status(self, client_id: str) -> str:
        return f"{self.root}/clients/{client_id}/status"

    def inbox(self, client_id: str) -> str:
        return f"{self.root}/clients/{client_id}/inbox"

    def update(self, client_id: str, round_: int) -> str:
        """Prefix of one client's update chunks for one round."""
        return f"{self.root}/clients/{client_id}/update/{round_}"

    @property
    def all_client_status(self) -> str:
        return f"{self.root}/clients/+/status"

    @property
    def all_updates(self) -> str:
        return f"{self.root}/clients/+/update/#"

    def shared_updates(self, group: str) -> str:
        """Every update chunk, shared among the subscribers of ``group`` (MQTT 5 ``$share``):
        each message goes to one of them."""
        return f"$share/{group}/{self.all_updates}"

    @property
    def aggregators(self) -> str:
        """Everything the aggregators send the coordinator."""
        return f"{self.root}/aggregators/#"

    def tally(self, aggregator: str) -> str:
        return f"{self.root}/aggregators/{aggregator}/tally"

    def partial(self, aggregator: str, round_: int) -> str:
        """Prefix of one aggregator's partial sum chunks for one round."""
        return f"{self.root}/aggregators/{aggregator}/partial/{round_}"

    @property
    def close(self) -> str:
        return f"{self.root}/aggregate/close"

    def parse_update(self, topic: str) -> tuple[str, str, str] | None:
        """``(client_id, round, chunk)`` as strings from an update chunk topic, else ``None``."""
        prefix = f"{self.root}/clients/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 4 or parts[1] != "update":
            return None
        return parts[0], parts[2], parts[3]

    def client_of_status(self, topic: str) -> str | None:
        prefix = f"{self.root}/clients/"
        if topic.startswith(prefix) and topic.endswith("/status"):
            return topic[len(prefix) : -len("/status")]
        return None
