"""What runs on a device: wire format, sparse codec, MQTT transport, local data, trainers, client.

Never imports TensorFlow at import time (a test proves it); the ``keras`` trainer imports it when
it is built. Names are re-exported lazily, so importing one small module (``errors``, ``wire``)
does not load paho-mqtt, numpy or LiteRT.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOME = {
    "EdgeClient": "client",
    "Identity": "client",
    "Model": "codec",
    "Update": "codec",
    "BrokerError": "errors",
    "ConfigError": "errors",
    "ExportError": "errors",
    "FedpruneError": "errors",
    "OversizeError": "errors",
    "WireError": "errors",
    "MqttTransport": "transport",
    "Transport": "transport",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
