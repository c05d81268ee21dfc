"""Helpers for the bad-input tables: run a ``deltafm`` command in-process, fingerprint a folder.

A bad-input case passes when the command exits with 2, prints one ``error:`` line naming the problem,
and leaves every existing file of a run exactly as it was (same names, same sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

__all__ = ["run_cli", "tree_digest"]


def run_cli(argv: Sequence[str]) -> tuple[int, str, str]:
    """``deltafm ARGV`` in this process: (exit status, stdout, stderr). SystemExit (argparse) counts too."""
    import torch

    from deltafm.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        finally:
            torch.set_num_threads(threads)
    return int(rc), out.getvalue(), err.getvalue()


def tree_digest(root: str | Path) -> dict[str, str]:
    """relative path -> sha256 of every file below ``root`` (empty when it does not exist)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
