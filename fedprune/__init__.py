"""fedprune: federated learning with TF-MOT pruning for edge devices over MQTT, exported to TFLite.

The runtime roles are subpackages, each kept in its own top-level folder of the repository and
installed under this one name (setuptools' ``package-dir`` in pyproject.toml):

    fedprune.device_profiles   device descriptions (standard library only)
    fedprune.protocol          what every role speaks: messages, codecs, the MQTT transport
    fedprune.edge_client       what runs on a device (no TensorFlow)
    fedprune.monitor           fedprune-monitor and the web dashboard
    fedprune.converters        Keras -> TFLite export and verification
    fedprune.coordinator       rounds, pruning, aggregation, the demo

Importing ``fedprune`` imports none of them, so ``fedprune.__version__`` is cheap everywhere.
"""

__version__ = "0.3.0"

__all__ = ["__version__"]
