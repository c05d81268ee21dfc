"""The one error family the command line turns into ``error: <message>`` and exit status 2.

Every error that means "the input is wrong, here is what to change" (a config key, a missing file, a
damaged checkpoint, an option out of range, a run that cannot start) derives from :class:`UserError`.
Each subclass keeps a builtin base as well (``ValueError`` or ``RuntimeError``) so code that caught those
keeps working. Anything else that escapes a command is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["UserError", "INPUT_OS_ERRORS", "CLI_ERRORS", "cli_error", "OneLineParser", "RelayedError",
           "run_command", "run_json_command"]


class UserError(Exception):
    """Bad input: the message names the problem and the fix; the CLI prints it and exits with 2."""


#: OS errors that mean a path given on the command line is wrong (missing, a folder where a file belongs,
#: a file where a folder belongs, not readable or writable): bad input, not a bug.
INPUT_OS_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
)
#: What every ``deltafm`` command turns into ``error: ...`` and exit status 2.
CLI_ERRORS: tuple[type[BaseException], ...] = (UserError, *INPUT_OS_ERRORS)


def cli_error(exc: BaseException) -> str:
    """The one-line message the CLI prints for ``exc`` (``error: ...``)."""
    text = str(exc).strip() or type(exc).__name__
    return f"error: {text}"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one ``error:`` line (exit status 2) without the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class RelayedError(UserError):
    """A failure every rank of a torchrun job stops for; rank 0 prints it, once for the job."""


def run_command(command: Callable[[Any], int], args: Any) -> int:
    """``command(args)``, with bad input printed as one ``error:`` line and exit status 2 (a
    :class:`RelayedError` only on rank 0, so a torchrun job says it once)."""
    try:
        return command(args)
    except UserError as e:
        if not isinstance(e, RelayedError) or os.environ.get("RANK", "0") == "0":
            print(cli_error(e), file=sys.stderr)
        return 2


def run_json_command(compute: Callable[[], dict[str, Any]], threads: int, out: str | os.PathLike | None = None) -> int:
    """A command that prints a JSON summary: ``compute()`` on ``threads`` torch threads (restored after), its
    dict plus ``seconds`` printed (and written to ``out``); bad input (:data:`CLI_ERRORS`, or ``threads`` < 1)
    is one ``error:`` line and exit status 2."""
    import json
    import time

    import torch

    before, t0 = torch.get_num_threads(), time.perf_counter()
    try:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        result = compute()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        text = json.dumps(result, indent=2)
        if out:
            with open(out, "w") as fh:
                fh.write(text + "\n")
    except CLI_ERRORS as e:
        print(cli_error(e), file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(before)
    print(text)
    return 0
