"""What runs on a device: wire format, sparse codec, MQTT transport, local data, trainers, client.

Never imports TensorFlow at import time (a test proves it); the ``keras`` trainer imports it when
it is built.
"""

from fedprune.edge_client.client import EdgeClient, Identity
from fedprune.edge_client.codec import Model, Update
from fedprune.edge_client.errors import (
    BrokerError,
    ConfigError,
    ExportError,
    FedpruneError,
    OversizeError,
    WireError,
)
from fedprune.edge_client.transport import MqttTransport, Transport

__all__ = [
    "BrokerError",
    "ConfigError",
    "EdgeClient",
    "ExportError",
    "FedpruneError",
    "Identity",
    "Model",
    "MqttTransport",
    "OversizeError",
    "Transport",
    "Update",
    "WireError",
]
