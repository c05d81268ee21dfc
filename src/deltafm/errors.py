"""The one error family the command line turns into ``error: <message>`` and exit status 2.

Every error that means "the input is wrong, here is what to change" (a config key, a missing file, a
damaged checkpoint, an option out of range, a run that cannot start) derives from :class:`UserError`.
Each subclass keeps a builtin base as well (``ValueError`` or ``RuntimeError``) so code that caught those
keeps working. Anything else that escapes a command is a bug and shows its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "INPUT_OS_ERRORS", "CLI_ERRORS", "cli_error"]


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
