"""Content-addressed blob store on local disk: ``blobs/sha256/<ab>/<hex>``.

Blobs are immutable and named by their hash, so writing the same bytes twice is a no-op and a
reader can never see a half-written blob (write aside, fsync, rename). An S3 store would
implement the same three methods.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from modelfleet.kernel.errors import BundleError, ModelNotFoundError

_HEX = re.compile(r"^[0-9a-f]{64}\Z")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _HEX.match(sha256):
            raise ModelNotFoundError(f"not a sha256 digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def put_file(self, src: Path, sha256: str) -> Path:
        """Move ``src`` (already fsynced, on the same filesystem) into the store."""
        digest = hashlib.sha256()
        with open(src, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != sha256:
            raise BundleError(f"upload hash {digest.hexdigest()} does not match {sha256}")
        dest = self.path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            src.unlink()
        else:
            os.replace(src, dest)
        return dest

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise ModelNotFoundError(f"no blob {sha256}") from None

    def read(self, sha256: str, offset: int = 0, chunk: int = 1 << 20) -> Iterator[bytes]:
        try:
            fh = open(self.path(sha256), "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise ModelNotFoundError(f"no blob {sha256}") from None
        with fh:
            fh.seek(offset)
            while block := fh.read(chunk):
                yield block
