"""What a model reference that is not a local path looks like: a hub id (nothing is ever downloaded)."""

from __future__ import annotations

__all__ = ["looks_like_hub_id"]


def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` (optionally ``org/name:subfolder``): what the hub would be asked for, not a local path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))
