"""The error a run raises when it cannot start (shared by the builders and the conditioning)."""

from __future__ import annotations

from deltafm.errors import UserError

__all__ = ["SetupError"]


class SetupError(UserError, RuntimeError):
    """The run cannot start (missing data, a model that cannot take the data, an occupied run folder)."""
