"""What an operator watches a run with: ``fedprune-monitor`` (a live terminal view, JSON for
scripts) and the web dashboard, from the coordinator's retained telemetry on the broker.

Reads the protocol only: no numpy, no TensorFlow, no LiteRT (the ``monitor`` extra: paho-mqtt,
msgpack, PyNaCl and rich).
"""
