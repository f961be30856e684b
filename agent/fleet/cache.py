"""The agent's bundle cache: verified bundles unpacked under ``cache/bundles/<name>/<version>``.

Only bundles that passed TUF verification are unpacked here (atomically, by rename); loading
re-checks every file against the manifest. Collection keeps what is desired or loaded and
evicts the rest, oldest first, when over the size cap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

# An hour without a byte: a download nobody wants any more, not one that is slow.
PARTIAL_IDLE_S = 3600.0
# Damaged bundles kept under cache/quarantine for a post-mortem.
QUARANTINE_KEEP = 3


def tree_size(path: Path) -> int:
    """Bytes in the files under ``path`` (0 if it is gone).

    Collection may remove a bundle, or a download finish, while this walks: a file that
    vanishes counts 0.
    """
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


class BundleCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.bundles = self.root / "bundles"
        self.partial = self.root / "partial"
        for d in (self.bundles, self.partial):
            d.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def path(self, name: str, version: int) -> Path:
        return self.bundles / name / str(version)

    def has(self, name: str, version: int) -> bool:
        return (self.path(name, version) / "manifest.json").exists()

    def entries(self) -> list[tuple[str, int, Path]]:
        out = []
        for mdir in self.bundles.iterdir() if self.bundles.exists() else ():
            if not mdir.is_dir():
                continue
            try:
                versions = list(mdir.iterdir())
            except FileNotFoundError:
                continue
            for vdir in versions:
                if vdir.is_dir() and vdir.name.isascii() and vdir.name.isdigit():
                    out.append((mdir.name, int(vdir.name), vdir))
        return out

    def size(self) -> int:
        return sum(tree_size(p) for _, _, p in self.entries())

    def collect(self, keep: set[tuple[str, int]]) -> list[tuple[str, int]]:
        """Remove versions not in ``keep``; return what was removed."""
        removed = []
        for name, version, path in self.entries():
            if (name, version) not in keep:
                shutil.rmtree(path, ignore_errors=True)
                removed.append((name, version))
        # Still over the cap with only kept versions: nothing more may go (they are in use).
        total = self.size()
        if total > self.max_bytes:
            log.warning(
                "bundle cache holds %d bytes of needed bundles, over the %d cap",
                total,
                self.max_bytes,
            )
        for name, version in removed:
            log.info("cache: collected %s v%d", name, version)
        return removed

    def quarantine(self, name: str, version: int) -> Path:
        """Move a damaged bundle out of the cache (for a post-mortem); return where it went.

        Only the newest few are kept: a disk that keeps corrupting must not fill up with them.
        """
        qdir = self.root / "quarantine"
        qdir.mkdir(exist_ok=True)
        dest = qdir / f"{name}-{version}-{time.time_ns()}"
        try:
            os.replace(self.path(name, version), dest)
        except FileNotFoundError:
            return dest
        # Newest first by the time in the name (a rename keeps the directory's old mtime).
        kept = sorted(qdir.iterdir(), key=lambda p: p.name.rsplit("-", 1)[-1], reverse=True)
        for old in kept[QUARANTINE_KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
        return dest

    def collect_partials(self, keep: set[str], idle_s: float = PARTIAL_IDLE_S) -> list[str]:
        """Remove abandoned downloads: not in ``keep`` (sha256s) and untouched for ``idle_s``.

        A download stops being desired when the fleet moves on mid-transfer; its pieces would
        otherwise stay forever. The idle time spares one still in progress (a blue/green
        prepare the desired state does not name by hash) and one a new version may yet resume.
        """
        removed = []
        now = time.time()
        for path in self.partial.iterdir() if self.partial.exists() else ():
            if path.name in keep:
                continue
            if now - _last_change(path) >= idle_s:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path.name)
                log.info("cache: removed abandoned partial download %s", path.name)
        return removed


def _last_change(path: Path) -> float:
    newest = 0.0
    with contextlib.suppress(FileNotFoundError):
        newest = path.stat().st_mtime
        for root, _dirs, files in os.walk(path):
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.stat(os.path.join(root, f)).st_mtime)
    return newest
