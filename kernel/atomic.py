"""Crash-safe file writes shared by every component: temp file + fsync + rename + dir fsync."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from pathlib import Path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Makes a rename durable: after a crash right after os.replace it could otherwise be lost."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int | None = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix.

    The temporary file lives in the same directory (``os.replace`` is atomic only within one
    filesystem) and is created with ``mode`` from the first instant, so a private key is never
    readable by others, not even between create and chmod. ``fchmod`` then sets the exact mode,
    because the process umask may have removed bits the caller asked for (0644 under umask 077).
    ``mode=None`` leaves the mode to the umask, as ``open()`` would (0666 minus the umask), for
    files whose privacy the user decides, like a batch run's output.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_json(
    path: str | os.PathLike[str],
    data: object,
    *,
    indent: int | None = None,
    mode: int | None = 0o644,
) -> None:
    """:func:`atomic_write` of ``data`` as JSON, one line per file unless ``indent`` is given.

    The text ends with a newline, so a JSON-lines file (a batch checkpoint) can take its first
    line from here and be appended to.
    """
    text = json.dumps(data, indent=indent) + "\n"
    atomic_write(path, text.encode(), mode)


def try_lock(path: str | os.PathLike[str], mode: int = 0o644) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if need be), or None if another holds it.

    Returns the descriptor; closing it releases the lock. A lock, not a pid file: the kernel
    releases it when the holder dies, even on kill -9, so nothing goes stale.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
