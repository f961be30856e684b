"""Contracts on the wire: the .proto files and the code grpc_tools generates from them, only.

Hand-written code shared by hub, agent and batch lives in ``kernel``.
"""
