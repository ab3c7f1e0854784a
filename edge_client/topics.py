"""The MQTT topic tree of one run: ``fedprune/v<major>/<run>/...`` (see docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass

from fedprune.edge_client.wire import PROTOCOL_MAJOR


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
    def all_models(self) -> str:
        return f"{self.root}/model/+/+"

    def model(self, version: int) -> str:
        """Prefix of the chunks of one model version; chunk ``i`` is at ``<prefix>/<i>``."""
        return f"{self.root}/model/{version}"

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
