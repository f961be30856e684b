"""agent/serving/shm.py on its own: the registry's bounds and the faults a client can cause
with its files, checked on real files under /dev/shm (no agent process)."""

from __future__ import annotations

import contextlib
import os
import uuid

import numpy as np
import pytest

from modelfleet.agent.serving import shm
from modelfleet.kernel.errors import ResourceExhaustedError


@pytest.fixture
def shm_file():
    made: list[str] = []

    def make(size: int) -> str:
        name = f"mf_shm_unit_{uuid.uuid4().hex[:12]}"
        fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
        made.append(name)
        return "/" + name

    yield make
    for name in made:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")


def test_read_write_stay_inside_the_window(shm_file) -> None:
    key = shm_file(64)
    reg = shm.SharedMemoryRegistry()
    reg.register("r", key, 16, 32)
    reg.write(shm.Placement("r", 8, 4), np.arange(2, dtype=np.float32).tobytes(), "t")
    with open(f"/dev/shm/{key[1:]}", "rb") as f:
        assert f.read()[20:28] == np.arange(2, dtype=np.float32).tobytes()
    assert reg.read(shm.Placement("r", 8, 4), "t") == np.arange(2, dtype=np.float32).tobytes()
    with pytest.raises(shm.ShmError, match="past the end of region 'r'"):
        reg.read(shm.Placement("r", 8, 28), "t")
    with pytest.raises(shm.ShmError, match="result is 12 bytes"):
        reg.write(shm.Placement("r", 8, 0), b"x" * 12, "t")
    with pytest.raises(shm.ShmError, match="goes past the end"):
        reg.register("r2", key, 40, 32)
    reg.close()
    assert reg.status() == []


@pytest.mark.parametrize("key", ["", "/", "/a/b", "/..", "..", "/x\0y"])
def test_keys_that_leave_dev_shm_are_refused(key: str) -> None:
    with pytest.raises(shm.ShmError, match="not a POSIX shared-memory name"):
        shm.SharedMemoryRegistry().register("r", key, 0, 8)


def test_symlink_is_not_followed(shm_file, tmp_path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 64)
    name = f"mf_shm_unit_link_{uuid.uuid4().hex[:8]}"
    os.symlink(target, f"/dev/shm/{name}")
    try:
        with pytest.raises(shm.ShmError, match="cannot open"):
            shm.SharedMemoryRegistry().register("r", "/" + name, 0, 8)
    finally:
        os.unlink(f"/dev/shm/{name}")


def test_shrunk_or_removed_file_is_an_error(shm_file) -> None:
    key = shm_file(64)
    reg = shm.SharedMemoryRegistry()
    reg.register("r", key, 0, 64)
    os.truncate(f"/dev/shm/{key[1:]}", 10)
    with pytest.raises(shm.ShmError, match="shrank"):
        reg.read(shm.Placement("r", 64, 0), "t")
    with pytest.raises(shm.ShmError, match="shrank"):
        reg.write(shm.Placement("r", 64, 0), b"x" * 64, "t")
    os.unlink(f"/dev/shm/{key[1:]}")
    with pytest.raises(shm.ShmError, match="removed after it was registered"):
        reg.read(shm.Placement("r", 4, 0), "t")
    # Created again under the same key: still not the file that was registered.
    fd = os.open(f"/dev/shm/{key[1:]}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 64)
    os.close(fd)
    with pytest.raises(shm.ShmError, match="removed after it was registered"):
        reg.read(shm.Placement("r", 4, 0), "t")
    reg.close()


def test_bounded_number_of_regions_and_unregister_closes(shm_file) -> None:
    key = shm_file(8)
    reg = shm.SharedMemoryRegistry(max_regions=3)
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(3):
        reg.register(f"r{i}", key, 0, 8)
    with pytest.raises(ResourceExhaustedError, match="3 shared-memory regions"):
        reg.register("r3", key, 0, 8)
    with pytest.raises(shm.RegionExistsError, match="already registered"):
        reg.register("r0", key, 0, 8)
    reg.unregister("r0")
    reg.unregister("never")  # as Triton: no error
    reg.register("r3", key, 0, 8)
    reg.unregister()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert os.path.exists(f"/dev/shm/{key[1:]}")  # the client's file is left alone


def test_parameters_are_checked() -> None:
    assert shm.placement({"classification": 2}, "o") is None
    p = shm.placement({shm.REGION: "r", shm.BYTE_SIZE: 8}, "o")
    assert p == shm.Placement("r", 8, 0)
    with pytest.raises(shm.ShmError, match="without shared_memory_region"):
        shm.placement({shm.BYTE_SIZE: 8}, "o")
    with pytest.raises(shm.ShmError, match="shared_memory_byte_size must be given"):
        shm.placement({shm.REGION: "r"}, "o")
    with pytest.raises(shm.ShmError, match="whole number"):
        shm.placement({shm.REGION: "r", shm.BYTE_SIZE: -1}, "o")


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("unix:/run/agent.sock", True),
        ("127.0.0.1", True),
        ("::1", True),
        ("ipv4:192.0.2.2:5000", False),
        ("ipv6:[fd00::2]:5000", False),
        ("192.0.2.2", False),
        ("", False),
        (None, False),
        ("garbage", False),
    ],
)
def test_only_clients_on_this_host_get_shared_memory(peer, local) -> None:
    assert shm.is_local_peer(peer) is local
    if not local:
        with pytest.raises(shm.NotLocalError, match="only to clients on this host"):
            shm.require_local(peer)
        with pytest.raises(shm.NotLocalError, match="only to clients on this host"):
            shm.read_input(None, shm.Placement("r", 4, 0), "x")


@pytest.mark.parametrize(
    "data", [np.zeros((0, 3), np.float32), np.zeros((2, 0), np.int64), np.array([], object)]
)
def test_an_empty_output_is_written_as_zero_bytes(shm_file, data) -> None:
    # A model may answer an empty tensor (a filter that kept no rows): that is zero bytes in
    # the region, not an INTERNAL error from casting a view with a zero in its shape.
    from modelfleet.agent.serving.dataplane import InferOutput

    key = shm_file(16)
    reg = shm.SharedMemoryRegistry()
    reg.register("r", key, 0, 16)
    with open(f"/dev/shm/{key[1:]}", "r+b") as f:
        f.write(b"\xaa" * 16)
    datatype = "BYTES" if data.dtype == object else "FP32"
    out = InferOutput("y", datatype, data.shape, data)
    shm.write_output(reg, out, shm.Placement("r", 0, 16))
    with open(f"/dev/shm/{key[1:]}", "rb") as f:
        # BYTES: an empty tensor encodes to nothing too; the region keeps what it held.
        assert f.read() == b"\xaa" * 16
    reg.close()
