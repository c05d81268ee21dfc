"""Crash-safe file writes, one implementation for the whole package.

A file is written to a temporary sibling, fsync'ed, then renamed over its name (``os.replace`` is atomic
on POSIX), and the folder is fsync'ed so the rename itself survives a power cut. A crash at any point
leaves the old file or the new one, never a mix, and at most a temporary file that the owner of the
folder recognises by its name and removes on its next start (run folders: ``.tmp-PID-*``; sample
stores: ``*.tmp``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["fsync_file", "fsync_dir", "atomic_write", "exclusive_lock"]


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any], tmp: Path | None = None) -> Path:
    """``write(tmp)`` fills a temporary sibling of ``path`` (default ``path.tmp``), which is fsync'ed and
    renamed over ``path``; the temporary file is removed when anything fails. Returns ``path``."""
    tmp = tmp if tmp is not None else path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def exclusive_lock(path: Path) -> int | None:
    """Take an exclusive, non-blocking ``fcntl.flock`` on ``path`` (created if missing) and return its file
    descriptor, to be kept open while writing (closing it, or the process ending even by SIGKILL, drops the
    lock). Returns None where flock does not exist (one writer assumed). Raises ``BlockingIOError`` when
    another process holds the lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows)
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise BlockingIOError(e.errno, f"{path} is locked by another process") from None
    return fd
