"""Input validation that needs the values of tensors (a device -> host synchronisation).

Checks such as "every class id lies in [0, K]" must read tensor values, which on a GPU stalls the
host until the device catches up. They guard the public entry points (the objective, the class
embedding, the running mean target) and are on by default. The training loop validates its data once
at load time and runs its steps inside :func:`validation_disabled`, so a step performs no such
synchronisation (see ``tests/test_sync.py``). Shape and dtype checks, which need no values, always run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["validation_enabled", "validation_disabled"]

_state = threading.local()


def validation_enabled() -> bool:
    """True unless the caller is inside :func:`validation_disabled` (per thread)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def validation_disabled() -> Iterator[None]:
    """Skip value checks (class-id ranges and the like) inside this block; inputs are trusted."""
    before = validation_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = before
