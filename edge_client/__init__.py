"""What runs on a device: local data, trainers (LiteRT; tf_keras when present), the client loop,
deployed models and inference, the device as a service. It speaks ``fedprune.protocol``.

Never imports TensorFlow at import time (a test proves it); the ``keras`` trainer imports it when
it is built. Names are re-exported lazily, so importing one small module does not load paho-mqtt,
numpy or LiteRT.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedprune.edge_client.client import EdgeClient
    from fedprune.edge_client.uplink import Identity

__all__ = ["EdgeClient", "Identity"]

_HOME = {"EdgeClient": "client", "Identity": "uplink"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
