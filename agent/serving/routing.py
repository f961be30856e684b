"""Which loaded version answers a request while two versions of a model are compared.

A :class:`Comparison` names the candidate (a version loaded and gated beside the active one, see
agent/slots.py) and two shares in basis points: ``split_bp`` of the requests are answered by the
candidate, ``shadow_bp`` of those answered by the active version are copied to it afterwards
(agent/serving/shadow.py). Pure functions over the slot's state, no I/O, so that the request
path pays a dict lookup when nothing is compared.

Sticky routing: a request carrying a routing key lands in the bucket
``blake2b(model, candidate version, key) mod 10000`` and goes to the candidate when the bucket
is below ``split_bp``. The hash is stable across processes and restarts (Python's ``hash()`` is
salted per process), and raising the share only adds buckets, so a key that reached the
candidate keeps reaching it while the share grows. Keys are per candidate version: the next
comparison reshuffles them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelfleet.agent.slots import LoadedVersion, ModelSlot

BASIS_POINTS = 10_000
# The request parameter (OIP `parameters`) and the gRPC metadata header that carry the key.
ROUTING_KEY_PARAMETER = "routing_key"
ROUTING_KEY_HEADER = "x-routing-key"
# A longer key is refused: it is hashed on the request path.
ROUTING_KEY_MAX_BYTES = 1024

ARM_ACTIVE = "active"
ARM_CANDIDATE = "candidate"
ARM_SHADOW = "shadow"
# A request that named its version: outside the comparison.
ARM_PINNED = "pinned"


@dataclass(frozen=True)
class Comparison:
    """Compare ``candidate`` with the active version of one model (shares in basis points)."""

    candidate: int
    split_bp: int = 0
    sticky: bool = False
    shadow_bp: int = 0
    # Who asked ("rollout 7", "experiment 3", "local"): shown, never a decision input.
    label: str = ""

    def __post_init__(self) -> None:
        for name in ("split_bp", "shadow_bp"):
            value = getattr(self, name)
            if not 0 <= value <= BASIS_POINTS:
                raise ValueError(f"{name} must be 0..{BASIS_POINTS}, not {value}")

    @property
    def active(self) -> bool:
        return self.split_bp > 0 or self.shadow_bp > 0

    def describe(self) -> str:
        parts = []
        if self.split_bp:
            parts.append(f"split {self.split_bp / 100:g}%{' sticky' if self.sticky else ''}")
        if self.shadow_bp:
            parts.append(f"shadow {self.shadow_bp / 100:g}%")
        what = ", ".join(parts) or "loaded only"
        return f"v{self.candidate}: {what}" + (f" ({self.label})" if self.label else "")


def bucket(key: str, model: str, candidate: int) -> int:
    """The key's bucket 0..9999 for this model's comparison with ``candidate``."""
    h = blake2b(f"{model}\0{candidate}\0{key}".encode(), digest_size=8).digest()
    # 64 bits modulo 10^4: the bias is below 10^-15, far under any share one can observe.
    return int.from_bytes(h, "little") % BASIS_POINTS


@dataclass(frozen=True)
class Route:
    version: LoadedVersion
    arm: str
    # The version a copy of the request goes to after the response, or None.
    shadow: LoadedVersion | None = None


def ready_candidate(slot: ModelSlot) -> LoadedVersion | None:
    """The comparison's candidate if it is loaded and gated beside a different active version.

    Only a version that passed its gate is ever in ``slot.previous`` (agent/slots.py), so being
    there is being ready; anything else (loading, refused, already active) compares nothing.
    """
    c = slot.comparison
    if c is None or slot.active is None:
        return None
    prev = slot.previous
    if prev is None or prev.version != c.candidate or slot.active.version == c.candidate:
        return None
    return prev


def choose(slot: ModelSlot, routing_key: str, rng: random.Random) -> Route | None:
    """Where a request without an explicit version goes; None: the active version, no copy."""
    c = slot.comparison
    if c is None or not c.active:
        return None
    candidate = ready_candidate(slot)
    active = slot.active
    if candidate is None or active is None:
        return None  # never fail a request because of a comparison: the active one answers
    if c.split_bp:
        if c.sticky and routing_key:
            draw = bucket(routing_key, slot.name, c.candidate)
        else:
            draw = rng.randrange(BASIS_POINTS)
        if draw < c.split_bp:
            return Route(candidate, ARM_CANDIDATE)
    shadow = candidate if c.shadow_bp and rng.randrange(BASIS_POINTS) < c.shadow_bp else None
    return Route(active, ARM_ACTIVE, shadow)


__all__ = [
    "ARM_ACTIVE",
    "ARM_CANDIDATE",
    "ARM_PINNED",
    "ARM_SHADOW",
    "BASIS_POINTS",
    "ROUTING_KEY_HEADER",
    "ROUTING_KEY_PARAMETER",
    "Comparison",
    "Route",
    "bucket",
    "choose",
    "ready_candidate",
]
