"""Unpack a bundle archive while its bytes arrive, resumably: one write of every byte, no copy.

The archive is the uncompressed tar that ``kernel.bundle.pack_bundle`` writes: for each of the
bundle files a 512-byte ustar header, the file's bytes and zero padding to the next 512-byte
boundary, then the end-of-archive zero blocks. :class:`StreamUnpacker` routes every incoming
byte to one of two places in a staging directory:

- ``files/<member>``: the member's content, which becomes the unpacked bundle file as is;
- ``headers``: everything else (headers, padding, end of archive), a few KiB.

Concatenating those pieces in the order the headers dictate gives back the exact archive, so a
download that was interrupted (lost link, kill -9, power cut) can be resumed: a new unpacker
replays the pieces through the same parser (and through the caller's hash, which must cover
every byte), truncates whatever a crash left torn, and reports the offset to continue from.

The bytes are not trusted while they arrive. The parser only accepts what ``pack_bundle``
produces: regular files named like the bundle files (the optional reference.json included),
each once, with valid header checksums;
anything else raises ``BundleError`` at once. Nothing here is loaded or moved into place: the
caller verifies the archive's hash first, then checks the manifest and renames ``files/``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

from modelfleet.kernel.atomic import fsync_dir
from modelfleet.kernel.bundle import BUNDLE_FILES, OPTIONAL_BUNDLE_FILES
from modelfleet.kernel.errors import BundleError

BLOCK = 512
HEADERS_FILE = "headers"
FILES_DIR = "files"
FSYNC_EVERY_BYTES = 4 << 20
_READ_CHUNK = 1 << 20
_REGULAR = (b"0", b"\0")
# Whether an optional member belongs is the manifest's call (load_bundle refuses one it does not
# list), checked once the archive is complete.
_MEMBERS = BUNDLE_FILES + OPTIONAL_BUNDLE_FILES
_USTAR_MAGIC = (b"ustar\x0000", b"ustar  \0")

Buffer = bytes | bytearray | memoryview
_OCTAL = re.compile(rb"[0-7]+")
# Where the pieces are opened: never through a symlink someone planted in the staging directory.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _octal(field: bytes, what: str, where: str) -> int:
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    # Digits only: int(x, 8) would also take a sign or underscores ("-1" as a size).
    if not _OCTAL.fullmatch(text):
        raise BundleError(
            f"{where}: not a bundle archive (bad {what} field {field[:16]!r} in a tar header)"
        )
    return int(text, 8)


def _parse_header(block: bytes, where: str) -> tuple[str, int]:
    """(name, size) of a regular-file ustar header; BundleError for anything else."""
    stored = _octal(block[148:156], "checksum", where)
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    if stored not in (unsigned, signed):
        raise BundleError(f"{where}: not a bundle archive (tar header checksum mismatch)")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:265] in _USTAR_MAGIC and block[345:500].strip(b"\0"):
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    text = name.decode("utf-8", "replace")
    kind = block[156:157]
    if kind in (b"x", b"g"):
        raise BundleError(
            f"{where}: the archive has a pax extended header; the bundle format uses plain ustar "
            f"headers only (pack_bundle writes them for files under 8 GiB)"
        )
    if text not in _MEMBERS or kind not in _REGULAR:
        what = "a regular file" if kind in _REGULAR else f"tar type {kind.decode('latin-1')!r}"
        raise BundleError(
            f"{where}: unexpected archive member {text!r} ({what}; a bundle holds only the "
            f"regular files {', '.join(BUNDLE_FILES)} and optionally "
            f"{', '.join(OPTIONAL_BUNDLE_FILES)})"
        )
    if block[124] & 0x80:
        raise BundleError(f"{where}: member {text!r} has a base-256 size (larger than 8 GiB)")
    return text, _octal(block[124:136], "size", where)


class StreamUnpacker:
    """Route a bundle archive's bytes into ``staging`` as they arrive (see the module doc).

    Use: ``offset = resume(hash_update)`` (0 for a fresh directory), then ``write(chunk)`` for
    the bytes from ``offset`` on, then ``finish()`` -> the directory holding the bundle files.
    ``close()`` releases the files (``discard()`` also removes them). Not thread-safe.
    """

    def __init__(
        self, staging: Path, *, where: str = "bundle archive", fsync_every: int = FSYNC_EVERY_BYTES
    ) -> None:
        self.staging = Path(staging)
        self.files = self.staging / FILES_DIR
        self.where = where
        self.fsync_every = fsync_every
        self.offset = 0
        self.seen: list[str] = []
        # Parser state: "header" (collecting 512 bytes), "data" (member content), "pad", "end".
        self._mode = "header"
        self._left = BLOCK
        self._header = bytearray()
        self._member: str | None = None
        self._meta: BinaryIO | None = None
        self._out: BinaryIO | None = None
        self._unsynced = 0
        self._replaying = False
        self._member_size = 0
        self._content = 0  # member content bytes so far; the rest of offset is in headers
        self._sizes: dict[str, int] = {}  # completed members

    # -- parsing (shared by replay and write) -----------------------------------------------------

    def _consumed(self, n: int, data: Buffer) -> None:
        """Advance the parser over ``n`` bytes of the current segment (``data`` is them)."""
        self.offset += n
        if self._mode == "end":
            return
        self._left -= n
        if self._mode == "data":
            self._content += n
        if self._mode == "header":
            self._header += data
            if self._left:
                return
            block, self._header = bytes(self._header), bytearray()
            if not any(block):
                # Also what a power cut can leave of a header: refusing it makes a resume start
                # over instead of routing the rest of the download into the headers file.
                missing = [name for name in BUNDLE_FILES if name not in self.seen]
                if missing:
                    raise BundleError(f"{self.where}: the archive lacks {', '.join(missing)}")
                self._mode, self._left = "end", 0
                return
            name, size = _parse_header(block, self.where)
            if name in self.seen:
                raise BundleError(f"{self.where}: {name} appears twice")
            self.seen.append(name)
            self._member, self._mode, self._left = name, "data", size
            self._open_member(name)
        if self._mode == "data" and self._left == 0:
            assert self._member is not None
            self._close_member()
            self._sizes[self._member] = self._member_size
            self._mode, self._left = "pad", -self._member_size % BLOCK
        if self._mode == "pad" and self._left == 0:
            self._mode, self._left = "header", BLOCK

    def _segment(self) -> tuple[bool, int]:
        """(is member content, bytes left in it) for the bytes that come next."""
        if self._mode == "data":
            return True, self._left
        return False, self._left if self._mode != "end" else 1 << 62

    def _open_member(self, name: str) -> None:
        self._member_size = self._left
        if not self._replaying:
            self._out = _open(self.files / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "wb")
            self._unsynced = 0

    def _close_member(self) -> None:
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._out = None

    # -- resuming ---------------------------------------------------------------------------------

    def resume(self, consume: Callable[[bytes], object] | None = None) -> int:
        """Replay what an earlier attempt left in ``staging``; return the offset to go on from.

        Every replayed byte goes to ``consume`` in archive order (so a hash can be rebuilt).
        A torn tail (a crash between writes) is truncated; a header the parser refuses means
        the pieces are unusable: ``BundleError``, and the caller starts again from zero. So is
        anything in ``staging`` that is not what this class writes (a directory where a piece
        belongs, a symlink).
        """
        meta_path = self.staging / HEADERS_FILE
        self._replaying = True
        readers: dict[str, BinaryIO] = {}
        try:
            self._make_dirs()
            meta = _open(meta_path, os.O_RDWR | os.O_CREAT, "r+b")
            readers[HEADERS_FILE] = meta
            while True:
                content, want = self._segment()
                if content:
                    assert self._member is not None
                    if self._member not in readers:
                        try:
                            readers[self._member] = _open(
                                self.files / self._member, os.O_RDONLY, "rb"
                            )
                        except FileNotFoundError:
                            break
                    reader = readers[self._member]
                else:
                    reader = meta
                data = reader.read(min(want, _READ_CHUNK))
                if not data:
                    break
                if consume is not None:
                    consume(data)
                self._consumed(len(data), data)
        except OSError as exc:
            raise BundleError(f"{self.where}: unusable partial download: {exc}") from None
        finally:
            for reader in readers.values():
                reader.close()
            self._replaying = False
        try:
            self._truncate_to_replayed()
        except OSError as exc:
            raise BundleError(f"{self.where}: unusable partial download: {exc}") from None
        return self.offset

    def _truncate_to_replayed(self) -> None:
        """Cut every piece to what the replay consumed: torn or extra bytes are not kept."""
        with _open(self.staging / HEADERS_FILE, os.O_RDWR, "r+b") as meta:
            meta.truncate(self.offset - self._content)
        for path in self.files.iterdir():
            if path.name not in self.seen:
                path.unlink()  # written after a header that did not survive
        for name, size in self._sizes.items():
            # Completed members: bytes beyond their size are no part of the hashed archive.
            with _open(self.files / name, os.O_RDWR | os.O_CREAT, "r+b") as fh:
                fh.truncate(size)
        if self._mode == "data":
            assert self._member is not None
            path = self.files / self._member
            with _open(path, os.O_RDWR | os.O_CREAT, "r+b") as out:
                out.truncate(self._member_size - self._left)
            self._out = _open(path, os.O_WRONLY | os.O_APPEND, "ab")

    def _make_dirs(self) -> None:
        for d in (self.staging, self.files):
            d.mkdir(parents=True, exist_ok=True)
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                raise BundleError(f"{self.where}: {d} is not a directory")

    # -- writing ----------------------------------------------------------------------------------

    def write(self, data: Buffer) -> None:
        """Route the next bytes of the archive; BundleError as soon as they are not a bundle."""
        if self._meta is None:
            self._make_dirs()
            self._meta = _open(
                self.staging / HEADERS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "ab"
            )
        view = memoryview(data).cast("B")
        while view:
            content, want = self._segment()
            part = view[:want]
            if content:
                assert self._out is not None
                self._out.write(part)
                self._unsynced += len(part)
                if self._unsynced >= self.fsync_every:
                    self._out.flush()
                    os.fsync(self._out.fileno())
                    self._unsynced = 0
            else:
                self._meta.write(part)
                self._meta.flush()  # so a kill -9 cannot lose a header its content follows
            self._consumed(len(part), part)
            view = view[len(part) :]

    def flush(self) -> None:
        """Hand everything written to the OS (a killed process then loses nothing)."""
        for fh in (self._meta, self._out):
            if fh is not None:
                fh.flush()

    def finish(self) -> Path:
        """Check the archive was complete and make its files durable; return ``files/``."""
        if self._mode != "end":
            inside = f"inside {self._member}" if self._mode == "data" else "before its end"
            raise BundleError(f"{self.where}: the archive is truncated ({inside})")
        missing = [name for name in BUNDLE_FILES if name not in self.seen]
        if missing:
            raise BundleError(f"{self.where}: the archive lacks {', '.join(missing)}")
        if self._meta is not None:
            self._meta.flush()
            os.fsync(self._meta.fileno())
        self.close()
        fsync_dir(self.files)  # the entries, before the directory is renamed into place
        return self.files

    def close(self) -> None:
        for fh in (self._out, self._meta):
            if fh is not None:
                with contextlib.suppress(OSError):
                    fh.close()
        self._out = self._meta = None

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _open(path: Path, flags: int, mode: str) -> BinaryIO:
    """A file object for ``path`` that refuses to follow a symlink (ELOOP -> OSError)."""
    fd = os.open(path, flags | _NOFOLLOW, 0o644)
    try:
        return cast(BinaryIO, os.fdopen(fd, mode))
    except BaseException:
        os.close(fd)
        raise


__all__ = ["FILES_DIR", "HEADERS_FILE", "StreamUnpacker"]
