"""StreamUnpacker: a bundle archive unpacked as it arrives, resumable at any byte."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from modelfleet.kernel.bundle import BUNDLE_FILES, pack_bundle
from modelfleet.kernel.bundle_stream import HEADERS_FILE, StreamUnpacker
from modelfleet.kernel.errors import BundleError
from tests.conftest import make_mlp_bundle


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp = tmp_path_factory.mktemp("archive")
    bundle = make_mlp_bundle(tmp / "repo", 2)
    pack_bundle(bundle.path, tmp / "b.tar")
    return (tmp / "b.tar").read_bytes()


def members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        out = {}
        for m in tar.getmembers():
            fh = tar.extractfile(m)
            assert fh is not None
            out[m.name] = fh.read()
        return out


def feed(unpacker: StreamUnpacker, data: bytes, chunk: int) -> None:
    for start in range(0, len(data), chunk):
        unpacker.write(data[start : start + chunk])


def unpacked(files: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in files.iterdir()}


@pytest.mark.parametrize("chunk", [1, 7, 512, 1000, 1 << 20])
def test_unpacks_exactly_what_tar_holds_whatever_the_chunking(
    tmp_path: Path, archive: bytes, chunk: int
) -> None:
    unpacker = StreamUnpacker(tmp_path / "s")
    feed(unpacker, archive, chunk)
    files = unpacker.finish()
    assert unpacked(files) == members(archive)
    assert sorted(unpacker.seen) == sorted(BUNDLE_FILES)
    assert unpacker.offset == len(archive)


def test_resumes_at_every_offset_with_the_hash_rebuilt(tmp_path: Path, archive: bytes) -> None:
    want = members(archive)
    for cut in [*range(0, len(archive), 89), len(archive) - 1]:
        staging = tmp_path / f"cut{cut}"
        first = StreamUnpacker(staging)
        feed(first, archive[:cut], 300)
        first.flush()  # then the process dies: nothing is closed or fsynced

        digest = hashlib.sha256()
        second = StreamUnpacker(staging)
        assert second.resume(digest.update) == cut
        assert digest.hexdigest() == hashlib.sha256(archive[:cut]).hexdigest()
        feed(second, archive[cut:], 1000)
        assert unpacked(second.finish()) == want, f"cut at {cut}"


def test_torn_tails_are_truncated_to_a_consistent_prefix(tmp_path: Path, archive: bytes) -> None:
    """A power cut loses the newest writes of one file or the other: resume from what is left."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        model = tar.getmember("model.onnx")
    cut = model.offset_data + model.size // 2
    for torn, lose in (("files/model.onnx", 100), (HEADERS_FILE, 600)):
        staging = tmp_path / torn.replace("/", "-")
        first = StreamUnpacker(staging)
        feed(first, archive[:cut], 4096)
        first.close()
        path = staging / torn
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(size - lose)

        digest = hashlib.sha256()
        second = StreamUnpacker(staging)
        offset = second.resume(digest.update)
        assert offset < cut
        assert digest.hexdigest() == hashlib.sha256(archive[:offset]).hexdigest()
        feed(second, archive[offset:], 4096)
        assert unpacked(second.finish()) == members(archive)


def _tar(entries: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            if kind == tarfile.SYMTYPE:
                info.size, info.linkname = 0, "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("../x", b"owned", tarfile.REGTYPE)], r"unexpected archive member '\.\./x'"),
        ([("model.onnx", b"", tarfile.SYMTYPE)], r"'model\.onnx' \(tar type '2'"),
        ([("health.npz", b"", tarfile.DIRTYPE)], r"'health\.npz/' \(tar type '5'"),
        (
            [("model.onnx", b"a", tarfile.REGTYPE), ("model.onnx", b"b", tarfile.REGTYPE)],
            "model.onnx appears twice",
        ),
    ],
)
def test_hostile_members_are_refused_as_their_header_arrives(
    tmp_path: Path, entries: list, message: str
) -> None:
    unpacker = StreamUnpacker(tmp_path / "s", where="evil.tar")
    with pytest.raises(BundleError, match=message):
        feed(unpacker, _tar(entries), 512)
    assert not (tmp_path / "s" / "files" / "x").exists()


def test_bad_checksum_truncation_and_missing_members(tmp_path: Path, archive: bytes) -> None:
    broken = bytearray(archive)
    broken[10] ^= 0x01  # inside the first member's name: the checksum no longer matches
    with pytest.raises(BundleError, match=r"not a bundle archive \(tar header checksum mismatch"):
        feed(StreamUnpacker(tmp_path / "a"), bytes(broken), 1000)

    short = StreamUnpacker(tmp_path / "b")
    feed(short, archive[:2000], 1000)
    with pytest.raises(BundleError, match="the archive is truncated"):
        short.finish()

    # Refused at the end-of-archive block, as soon as it is clear members are missing.
    lacking = StreamUnpacker(tmp_path / "c")
    with pytest.raises(BundleError, match=r"lacks manifest\.json, health\.npz"):
        feed(lacking, _tar([("model.onnx", b"x", tarfile.REGTYPE)]), 1000)


def test_chunk_data_refuses_truncated_messages() -> None:
    from modelfleet.agent.fleet.transport import chunk_data

    assert bytes(chunk_data(b"\x0a\x03abc\x10\x07")) == b"abc"
    for bad in (b"\x0a\x05abc", b"\x0a\x01A\x11\x00", b"\x0a\x01A\x15\x00\x00", b"\x0a\x80"):
        with pytest.raises(ValueError, match="Chunk message"):
            chunk_data(bad)
