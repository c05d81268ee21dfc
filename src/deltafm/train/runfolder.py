"""The run folder: the one place that writes below a training run's ``OUT``, crash-safe.

    OUT/.lock                 flock'ed by the one process writing the run; holds its PID while it runs
    OUT/config.yaml           written atomically (temporary file, fsync, rename), only when it changes
    OUT/log.jsonl             append-only
    OUT/samples/step_X.png    written atomically
    OUT/tb/                   TensorBoard's own writer
    OUT/wandb/, wandb_id.txt  W&B's own offline writer (optional, ``log.wandb``); the id file atomically
    OUT/checkpoints/step_X/   atomic folders (:mod:`deltafm.train.checkpoint`), pruned by rename-then-delete

**The lock.** The process that writes a run holds an exclusive ``fcntl.flock`` on ``OUT/.lock`` for the
run's lifetime (only rank 0 under torchrun). The kernel drops it when the process ends, even by SIGKILL,
so a crashed run never blocks the next one; a second live process on the same folder gets a
:class:`~deltafm.train.builders.SetupError` naming the holder's PID and changes nothing. The lock is
taken before the checkpoint to resume from is chosen (when ``OUT`` exists) and at the latest before the
first write; the lock file is removed when the run ends, so a finished run folder holds none.

**Debris.** While the lock is held nobody else writes, so whatever a writer makes on the way is the
debris of a dead writer: ``.tmp-*`` files and folders (being written), ``.del-*`` folders (being
deleted), ``step_*`` folders without the COMPLETE marker that hold only files a checkpoint writer makes
(left by older versions), and a partial last line of ``log.jsonl``. :meth:`RunFolder.open` removes it
and says so in one line. A ``step_X.replaced-PID`` folder (the old copy of a step being written again)
is put back when ``step_X`` is missing, removed otherwise.

**Order of a run** (:mod:`deltafm.train.loop`): validate and build everything (batch sizes, data, model),
lock, choose and verify the checkpoint (:meth:`RunFolder.checkpoint_to_resume`), restore the state; only
then :meth:`RunFolder.open` and the writes. A failure before that leaves the folder as it was.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from deltafm.atomic import atomic_write, fsync_dir

from .builders import SetupError
from .checkpoint import (
    DEBRIS_PREFIXES,
    REPLACED_TAG,
    CheckpointError,
    discard,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    step_of,
    verify_checkpoint,
)

__all__ = ["RunFolder", "LOCK_NAME", "remove_debris"]

LOCK_NAME = ".lock"
#: the files a checkpoint writer puts in a step folder (an incomplete folder holding only these is debris)
_WRITER_FILES = frozenset({"model.safetensors", "ema.safetensors", "state.safetensors", "state.json",
                           "manifest.json", "COMPLETE"})
Say = Callable[[str], None]


class RunFolder:
    """The run folder ``root``: its lock, its atomic writes, the checkpoint choice of ``--resume auto``.

    ``enabled=False`` (ranks other than 0) makes every method a no-op that writes nothing. Use it as a
    context manager, or call :meth:`release`, so that the lock is given back when the run ends."""

    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled
        self._fd: int | None = None
        self._open = False
        self._was_missing = False  # the folder did not exist when lock() was called (no checkpoint chosen)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------------------------ the lock

    def lock(self) -> None:
        """Take the lock when the folder exists (else :meth:`open` takes it). Writes only the lock file,
        which :meth:`release` removes again; a folder in use is a SetupError naming the holder's PID."""
        if not self.enabled or self._fd is not None:
            return
        self._was_missing = not self.root.is_dir()
        if not self._was_missing:
            self._fd = _acquire(self.root / LOCK_NAME)

    def release(self) -> None:
        """Give the lock back and remove the lock file (safe against a process that opened it meanwhile:
        a lock taken on a removed file is retried on the new one)."""
        fd, self._fd, self._open = self._fd, None, False
        if fd is None:
            return
        try:
            if _same_file(fd, self.root / LOCK_NAME):
                os.unlink(self.root / LOCK_NAME)
        except OSError:  # pragma: no cover - the folder went away
            pass
        finally:
            os.close(fd)  # drops the flock

    # --------------------------------------------------------------------------- start of writing

    def open(self, say: Say) -> None:
        """Start writing: create the folder, hold the lock, remove the debris of dead writers (one line)."""
        if not self.enabled:
            return
        late = self._was_missing
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SetupError(f"cannot create the run folder {self.root}: {e}") from None
        self.lock()
        if late:  # the folder did not exist when the checkpoint was chosen: nobody may have filled it since
            taken = [p.name for p in list_checkpoints(self.checkpoints) if (p / "COMPLETE").is_file()]
            if taken:
                raise SetupError(f"{self.root} received checkpoints ({taken[-1]}) from another process while "
                                 "this run was starting; nothing was written: choose another --out")
        removed = remove_debris(self.root)
        if removed:
            more = f" and {len(removed) - 5} more" if len(removed) > 5 else ""
            say(f"removed the debris of an interrupted run: {', '.join(removed[:5])}{more}")
        self._open = True

    def _check_open(self) -> None:
        if not (self.enabled and self._open):
            raise RuntimeError("RunFolder: open() must succeed before anything is written")

    # ------------------------------------------------------------------------------------- writes

    def write_file(self, name: str, write: Callable[[Path], Any]) -> Path:
        """Write ``OUT/name`` atomically: ``write(tmp)`` fills a temporary sibling (same suffix), which is
        fsync'ed and renamed over the name. A crash leaves the old file or the new one, never a mix."""
        self._check_open()
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, write, tmp=path.with_name(f".tmp-{os.getpid()}-{path.name}"))

    def write_text(self, name: str, text: str) -> Path:
        """:meth:`write_file` for text; an identical file is left alone (nothing is rewritten)."""
        path = self.root / name
        data = text.encode("utf-8")
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            self._check_open()
            return path
        return self.write_file(name, lambda p: p.write_bytes(data))

    def append(self, name: str) -> TextIO:
        """``OUT/name`` opened for appending (the JSONL log)."""
        self._check_open()
        return open(self.root / name, "a", encoding="utf-8")

    def save_checkpoint(self, step: int, model: dict[str, torch.Tensor], state: dict[str, Any],
                        ema: dict[str, torch.Tensor] | None = None, keep_last: int | None = None) -> Path:
        """:func:`deltafm.train.checkpoint.save_checkpoint` into ``OUT/checkpoints``."""
        self._check_open()
        return save_checkpoint(self.checkpoints, step, model, state, ema=ema, keep_last=keep_last)

    def set_aside_newer(self, step: int, say: Say) -> list[Path]:
        """Rename step folders newer than ``step`` (invalid ones a resume skipped) to ``step_X.invalid-N``
        so that the checkpoints of the continued run do not mix with them. Nothing is deleted."""
        self._check_open()
        moved = []
        for p in list_checkpoints(self.checkpoints):
            if step_of(p) > step:
                n = 0
                while (dest := p.with_name(f"{p.name}.invalid-{n}")).exists():
                    n += 1
                os.replace(p, dest)
                say(f"set aside {p.name} (not used by this resume) as {dest.name}")
                moved.append(dest)
        if moved:
            fsync_dir(self.checkpoints)
        return moved

    # ---------------------------------------------------------------------------- which checkpoint

    def checkpoint_to_resume(self, resume: str | None, say: Say) -> Path | None:
        """The verified checkpoint a run continues from (None: from scratch). Call it with the lock held.

        * ``None``: a folder that already holds checkpoints is a SetupError (nothing is overwritten);
        * ``"auto"``: the newest valid checkpoint, skipping damaged ones with a warning; a folder without
          checkpoints (debris of interrupted writes does not count) starts from scratch; a folder whose
          every checkpoint is damaged is a CheckpointError (a resume must not silently restart);
        * a path: :func:`~deltafm.train.checkpoint.resolve_checkpoint` (an invalid one is an error).
        """
        warn = lambda m: say(f"warning: {m}")  # noqa: E731
        if resume is None:
            existing = [p for p in list_checkpoints(self.checkpoints) if (p / "COMPLETE").is_file()]
            if existing:
                raise SetupError(f"{self.root} already holds checkpoints (newest {existing[-1].name}); pass "
                                 "--resume auto to continue that run, or choose another --out (nothing was changed)")
            return None
        if resume != "auto":
            try:
                return resolve_checkpoint(resume, warn)
            except OSError as e:  # pragma: no cover
                raise CheckpointError(f"cannot read checkpoint {resume}: {e}") from None
        damaged = []
        for p in reversed(list_checkpoints(self.checkpoints)):
            if _is_debris_step(p):
                continue  # an interrupted write: open() removes it
            try:
                verify_checkpoint(p)
            except CheckpointError as e:
                damaged.append(f"{p.name}: {str(e).replace(f'checkpoint {p}: ', '').replace(str(p), p.name)}")
                continue
            for d in damaged:
                warn(f"skipping checkpoint {d}")
            return p
        if damaged:
            raise CheckpointError(
                f"--resume auto: no valid checkpoint in {self.checkpoints}, so the run cannot continue: "
                f"{'; '.join(damaged)}. Nothing was changed. To start over from step 0 on purpose, choose "
                f"another --out or move {self.root} away; to continue, restore the damaged files"
            )
        say(f"no checkpoint in {self.checkpoints}: starting from scratch")
        return None


# ----------------------------------------------------------------------------------------------------
# The lock file
# ----------------------------------------------------------------------------------------------------


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(path: Path) -> int:
    """flock ``path`` (created if missing) without waiting; write our PID into it; return the fd."""
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise SetupError(f"cannot lock the run folder {path.parent}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SetupError(f"cannot lock the run folder {path.parent}: {e}") from None
            raise SetupError(_busy(path)) from None
        if _same_file(fd, path):  # else the holder removed the file between our open and flock: retry
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise SetupError(f"cannot lock the run folder {path.parent}: its lock file keeps changing")  # pragma: no cover


def _busy(path: Path) -> str:
    try:
        pid = path.read_text().split()[0]
    except (OSError, IndexError):
        pid = "unknown"
    who = "this process" if pid == str(os.getpid()) else "another process"
    return (f"the run folder {path.parent} is in use by {who} (PID {pid}, holding {path.name}): wait for it "
            "to finish or stop it, or choose another --out (nothing was changed)")


# ----------------------------------------------------------------------------------------------------
# Debris
# ----------------------------------------------------------------------------------------------------


def _is_debris_step(p: Path) -> bool:
    """A step folder without COMPLETE that holds only files a checkpoint writer makes (anything else,
    e.g. a pickle someone put there, is left alone and reported as invalid)."""
    if (p / "COMPLETE").is_file():
        return False
    try:
        return all(c.is_file() and c.name in _WRITER_FILES for c in p.iterdir())
    except OSError:  # pragma: no cover
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_debris(root: str | Path) -> list[str]:
    """Remove what dead writers left in the run folder ``root`` (see the module docstring); the names
    removed, relative to ``root``. Call it only with the folder's lock held."""
    root = Path(root)
    found: list[str] = []
    ck = root / "checkpoints"
    for folder in (root, root / "samples", ck):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.name.startswith(DEBRIS_PREFIXES):
                    _remove(p)
                    found.append(str(p.relative_to(root)))
    if ck.is_dir():
        for p in sorted(ck.glob(f"step_*{REPLACED_TAG}*")):
            orig = p.with_name(p.name.split(REPLACED_TAG)[0])
            if not orig.exists() and (p / "COMPLETE").is_file():
                os.replace(p, orig)
                found.append(f"{p.relative_to(root)} (put back as {orig.name})")
            else:
                discard(p)
                found.append(str(p.relative_to(root)))
        for p in list_checkpoints(ck):
            if _is_debris_step(p):
                discard(p)
                found.append(f"{p.relative_to(root)} (incomplete)")
    if _drop_partial_line(root / "log.jsonl"):
        found.append("the partial last line of log.jsonl")
    if found:
        for folder in (root, root / "samples", ck):
            if folder.is_dir():
                fsync_dir(folder)
    return found


def _drop_partial_line(path: Path) -> bool:
    """Cut a last line without its newline (a record whose write was interrupted); True if one was cut."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        if tail.endswith(b"\n"):
            return False
        cut = tail.rfind(b"\n")
        f.truncate(size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
        f.flush()
        os.fsync(f.fileno())
    return True
