"""The shared kernel: what hub, agent and batch all build on, and nothing of theirs.

The bundle format and its streaming unpack, the error family (and its gRPC mapping), atomic
files and locks, settings loading, logging, identity helpers, sdnotify, malloc tuning, the MQTT
client and topic helpers, the onnxruntime wrapper and the telemetry bucket bounds. The kernel
imports only ``protos`` (generated contracts) and third-party libraries: never ``agent``,
``hub`` or ``batch`` (tests/test_layers.py checks it).
"""
