"""What every role speaks: the messages, their envelope and chunks, the topics, signing, the
update and model codecs, the telemetry records, the MQTT transport (the only module that imports
paho-mqtt), the broker connection and its command-line options, and the one error tree.

Devices, monitors, converters and the coordinator all build on it; it imports none of them, and
never TensorFlow (docs/architecture.md, layers).
"""
