"""modelfleet agent: serves verified ONNX bundles over the Open Inference Protocol.

Folders follow the two paths through the agent:

- inference path: ``serving/`` (gRPC edge -> converters -> dataplane -> batcher -> runtime)
- update path: ``repository`` (what is on disk) -> ``slots`` (blue/green) -> ``gate`` (health gate)
"""

from modelfleet.kernel.commandline import package_version

# The installed package's, as `--version` prints it; reported to the hub and in ServerMetadata.
__version__ = package_version()
