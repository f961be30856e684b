"""Contracts shared by hub, agent and batch: wire protocols, the bundle format, the error family.

Nothing here imports from ``agent``, ``hub`` or ``batch``, so each of them can depend on it
without depending on each other.
"""
