"""System shared memory (Triton's extension): tensors read from and written to regions of
POSIX shared-memory files a client created, so large tensors skip the socket.

A region is (name -> key, offset, byte_size): a window of the file ``/dev/shm/<key>``. The
server opens the client's file read/write when it is registered and closes it when it is
unregistered; it never creates, truncates or unlinks anything under /dev/shm.

Access goes through ``pread``/``pwrite`` on the open descriptor rather than a mapping: a client
may shrink or remove its file at any moment, and touching a mapping past a shrunk file's end
is a SIGBUS that kills the agent, whereas a short read is an error we can report. Before each
access the file's current size and identity are checked, so a file that was destroyed (and
perhaps created again under the same key) after registering gives a clean error, not stale
data. The copy costs what slicing a mapping would (the tensor must be copied out anyway, as
the client may change the region while the model runs).

Both transports call in here: the request parameters ``shared_memory_region``,
``shared_memory_byte_size`` and ``shared_memory_offset`` on an input say where its data is,
and on a requested output where its result goes (the response then carries no data for it).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelfleet.agent.serving.dataplane import InferOutput
from modelfleet.kernel.datatypes import encode_bytes_tensor
from modelfleet.kernel.errors import (
    ModelfleetError,
    ResourceExhaustedError,
    Status,
)

SHM_DIR = "/dev/shm"
# Each region holds an open descriptor; a client registering without end must not run the
# agent out of them.
MAX_REGIONS = 64

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
PARAMETERS = frozenset({REGION, BYTE_SIZE, OFFSET})


class RegionNotFoundError(ModelfleetError):
    status = Status.NOT_FOUND
    reason = "shm_region"


class RegionExistsError(ModelfleetError):
    status = Status.ALREADY_EXISTS
    reason = "shm_region"


class NotLocalError(ModelfleetError):
    status = Status.PERMISSION_DENIED
    reason = "shm_not_local"


NOT_LOCAL = (
    "shared memory is served only to clients on this host (over loopback): a region is a file "
    "on this machine; send the tensors in the request instead"
)


# Every inference call asks (grpc_server._shm_for); a connection keeps its peer string, so the
# address is parsed once per connection instead of on each request.
@functools.lru_cache(maxsize=4096)
def is_local_peer(peer: str | None) -> bool:
    """Whether a gRPC peer (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:...``) or an
    HTTP remote address (``127.0.0.1``, ``::1``) is this host. Shared memory is only for those:
    a remote client has no business naming files in this machine's /dev/shm."""
    if not peer:
        return False
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rpartition(":")[0] if kind in ("ipv4", "ipv6") else peer
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def require_local(peer: str | None) -> None:
    if not is_local_peer(peer):
        raise NotLocalError(NOT_LOCAL)


class ShmError(ModelfleetError):
    status = Status.INVALID_ARGUMENT
    reason = "shm"


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    path: str
    fd: int
    dev: int
    ino: int


@dataclass(frozen=True)
class Placement:
    """Where one tensor lives: ``byte_size`` bytes at ``offset`` within region ``region``."""

    region: str
    byte_size: int
    offset: int


def _key_path(key: str) -> str:
    # shm_open names are "/name" (the slash optional here): one path component, nothing that
    # could leave /dev/shm.
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ShmError(
            f"shared-memory key {key!r} is not a POSIX shared-memory name: give the key the "
            "client created, like '/my_region' (one name, no other slashes)"
        )
    return os.path.join(SHM_DIR, name)


class SharedMemoryRegistry:
    def __init__(self, max_regions: int = MAX_REGIONS) -> None:
        self.max_regions = max_regions
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise ShmError("register: give the region a name")
        if offset < 0 or byte_size <= 0:
            raise ShmError(
                f"register {name!r}: offset must be >= 0 and byte_size > 0 "
                f"(got offset {offset}, byte_size {byte_size})"
            )
        path = _key_path(key)
        with self._lock:
            if name in self._regions:
                raise RegionExistsError(
                    f"shared-memory region {name!r} is already registered "
                    f"(key {self._regions[name].key!r}): unregister it first, or pick another name"
                )
            if len(self._regions) >= self.max_regions:
                raise ResourceExhaustedError(
                    f"register {name!r}: {self.max_regions} shared-memory regions are already "
                    "registered, the most this agent keeps; unregister some first"
                )
            try:
                # No O_CREAT: the client owns the file. O_NOFOLLOW: a link planted under
                # /dev/shm must not point us at some other file.
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ShmError(
                    f"register {name!r}: no shared-memory file for key {key!r} ({path}); "
                    "create it first (e.g. tritonclient.utils.shared_memory."
                    "create_shared_memory_region)"
                ) from None
            except OSError as exc:
                raise ShmError(
                    f"register {name!r}: cannot open {path} read/write: {exc.strerror}"
                ) from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise ShmError(f"register {name!r}: {path} is not a regular file")
                if offset + byte_size > st.st_size:
                    raise ShmError(
                        f"register {name!r}: offset {offset} + byte_size {byte_size} = "
                        f"{offset + byte_size} goes past the end of {path} ({st.st_size} bytes)"
                    )
            except BaseException:
                os.close(fd)
                raise
            self._regions[name] = Region(
                name, key, offset, byte_size, path, fd, st.st_dev, st.st_ino
            )

    def unregister(self, name: str = "") -> None:
        """Close region ``name``; empty: every region. An unknown name is not an error (as
        Triton), so a client can clean up without asking first."""
        with self._lock:
            names = [name] if name else list(self._regions)
            for n in names:
                region = self._regions.pop(n, None)
                if region is not None:
                    os.close(region.fd)

    def close(self) -> None:
        self.unregister("")

    def status(self, name: str = "") -> list[Region]:
        with self._lock:
            if not name:
                return list(self._regions.values())
            region = self._regions.get(name)
        if region is None:
            raise RegionNotFoundError(f"no shared-memory region {name!r} is registered")
        return [region]

    def _span(self, placement: Placement, what: str) -> tuple[Region, int]:
        """The region and the file offset of ``placement``, after checking it still fits."""
        region = self._regions.get(placement.region)
        if region is None:
            raise RegionNotFoundError(
                f"{what}: shared-memory region {placement.region!r} is not registered "
                "(register it first)"
            )
        if placement.offset < 0 or placement.byte_size < 0:
            raise ShmError(f"{what}: {OFFSET} and {BYTE_SIZE} must be >= 0")
        if placement.offset + placement.byte_size > region.byte_size:
            raise ShmError(
                f"{what}: {OFFSET} {placement.offset} + {BYTE_SIZE} {placement.byte_size} goes "
                f"past the end of region {region.name!r} ({region.byte_size} bytes)"
            )
        start = region.offset + placement.offset
        try:
            now = os.stat(region.path, follow_symlinks=False)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (region.dev, region.ino):
            raise ShmError(
                f"{what}: the file of shared-memory region {region.name!r} ({region.path}) was "
                "removed after it was registered; unregister the region and register it again"
            )
        if start + placement.byte_size > os.fstat(region.fd).st_size:
            raise ShmError(
                f"{what}: the file of shared-memory region {region.name!r} ({region.path}) "
                "shrank after it was registered; unregister the region and register it again"
            )
        return region, start

    def check(self, placement: Placement, what: str) -> None:
        """Raise now, before the model runs, if ``placement`` could not be written."""
        with self._lock:
            self._span(placement, what)

    def read(self, placement: Placement, what: str) -> bytes:
        with self._lock:
            region, start = self._span(placement, what)
            data = os.pread(region.fd, placement.byte_size, start)
        if len(data) != placement.byte_size:
            raise ShmError(
                f"{what}: read {len(data)} of {placement.byte_size} bytes from shared-memory "
                f"region {region.name!r}: its file shrank; register it again"
            )
        return data

    def write(self, placement: Placement, data: bytes | memoryview, what: str) -> None:
        size = len(data) if isinstance(data, bytes) else data.nbytes
        if size > placement.byte_size:
            raise ShmError(
                f"{what}: the result is {size} bytes, but {BYTE_SIZE} is {placement.byte_size}; "
                "give a larger shared-memory window for it"
            )
        with self._lock:
            region, start = self._span(placement, what)
            view = memoryview(data).cast("B")
            done = 0
            while done < size:  # pwrite may write less than asked; bounded by `size`
                n = os.pwrite(region.fd, view[done:], start + done)
                if n <= 0:
                    raise ShmError(
                        f"{what}: writing to shared-memory region {region.name!r} failed"
                    )
                done += n


def _int_param(params: dict[str, Any], key: str, where: str, default: int | None) -> int:
    value = params.get(key, default)
    if value is None:
        raise ShmError(f"{where}: {REGION} is set, so {key} must be given too")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShmError(f"{where}: parameter {key!r} must be a whole number >= 0, got {value!r}")
    return value


def placement(params: dict[str, Any], where: str) -> Placement | None:
    """The shared-memory placement an input's or output's parameters ask for; None: none."""
    if REGION not in params:
        stray = sorted(PARAMETERS & params.keys())
        if stray:
            raise ShmError(f"{where}: {', '.join(stray)} given without {REGION}")
        return None
    region = params[REGION]
    if not isinstance(region, str) or not region:
        raise ShmError(f"{where}: parameter {REGION!r} must be a region name")
    return Placement(
        region,
        _int_param(params, BYTE_SIZE, where, None),
        _int_param(params, OFFSET, where, 0),
    )


def output_placements(
    registry: SharedMemoryRegistry | None, output_parameters: dict[str, dict[str, Any]]
) -> dict[str, Placement]:
    """Outputs to write into shared memory; each region is checked before the model runs."""
    out: dict[str, Placement] = {}
    for name, params in output_parameters.items():
        where = f"output {name!r}"
        p = placement(params, where)
        if p is None:
            continue
        if registry is None:
            raise NotLocalError(f"{where}: {NOT_LOCAL}")
        registry.check(p, where)
        out[name] = p
        for key in PARAMETERS:
            params.pop(key, None)
    return out


def read_input(registry: SharedMemoryRegistry | None, p: Placement, name: str) -> bytes:
    if registry is None:
        raise NotLocalError(f"input {name!r}: {NOT_LOCAL}")
    return registry.read(p, f"input {name!r}")


def write_output(registry: SharedMemoryRegistry, out: InferOutput, p: Placement) -> None:
    if out.datatype == "BYTES":
        raw: bytes | memoryview = encode_bytes_tensor(out.data)
    else:
        # The protocol is little-endian; a native array is on x86 and ARM. Flat bytes through
        # numpy rather than memoryview.cast, which refuses a shape with a zero (an empty result).
        raw = np.ascontiguousarray(out.data).reshape(-1).view(np.uint8).data
    registry.write(p, raw, f"output {out.name!r}")
