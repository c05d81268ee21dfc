"""Where a result was computed: code commit, library versions and machine (:func:`environment`).

Studies record this in every results file so a number can be traced to the code and hardware that made
it: ``commit`` (``git rev-parse HEAD`` of the checkout deltafm is imported from; outside a git checkout the
environment variable ``DELTAFM_COMMIT``, e.g. set by a script that copies the tree to another machine, else
None), ``dirty`` (tracked files differ from the commit), ``deltafm``, ``torch``, ``numpy`` and
``python`` versions, ``system``, ``machine`` (architecture), ``cpu`` (model name), ``cores`` (logical CPUs)
and, when CUDA is available, ``gpus`` (device names). No host name or user name is recorded.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["environment", "cpu_model", "git_commit"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(root: Path | None = None, untracked: bool = False) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding ``root`` (default: the one deltafm is imported from); dirty
    counts changed tracked files, and with ``untracked`` also files git does not track (and does not ignore).
    Outside a git checkout (a copied tree, an installed package) the environment's ``DELTAFM_COMMIT`` (dirty
    unknown), else (None, None)."""
    import deltafm

    root = root or Path(deltafm.__file__).resolve().parent
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return os.environ.get("DELTAFM_COMMIT") or None, None
    status = _git(root, "status", "--porcelain", *([] if untracked else ["--untracked-files=no"]))
    return head.strip(), (bool(status.strip()) if status is not None else None)


@lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    import numpy
    import torch

    import deltafm

    return {"deltafm": deltafm.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "system": platform.system(),
            "machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count()}


def environment() -> dict[str, Any]:
    """The provenance record (module docstring). The commit is read again on every call (a long study may
    run across commits); the rest once per process."""
    import torch

    commit, dirty = git_commit()
    env = {"commit": commit, "dirty": dirty, **_static()}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env
