"""modelfleet agent: serves verified ONNX bundles over the Open Inference Protocol.

Folders follow the two paths through the agent:

- inference path: ``serving/`` (gRPC edge -> converters -> dataplane -> batcher -> runtime)
- update path: ``repository`` (what is on disk) -> ``slots`` (blue/green) -> ``gate`` (health gate)
"""

__version__ = "0.1.0"
