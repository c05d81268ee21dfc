"""The training framework: typed config, loop, checkpoints, EMA, distributed helpers, logs.

The loop (``loop.py``) is made of ``setup.py`` (validate, build, resume), ``step.py`` (one optimizer
step, one host sync), ``bookkeeping.py`` (logs, grids, checkpoints), ``state.py`` (:class:`RunState`,
what a checkpoint holds) and ``signals.py``.

Entry points: :func:`deltafm.train.loop.train` (also ``deltafm train``), :func:`load_config`.
Importing this package needs the ``[train]`` extra (pyyaml); the loop itself is imported lazily.
"""

from deltafm.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    PickleCheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from deltafm.train.config import Config, ConfigError, config_from_dict, format_config, load_config
from deltafm.train.ema import EMA
from deltafm.train.state import RunState

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Config",
    "ConfigError",
    "EMA",
    "PickleCheckpointError",
    "RunState",
    "config_from_dict",
    "find_latest_checkpoint",
    "format_config",
    "load_checkpoint",
    "load_config",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
    "verify_checkpoint",
]


def __getattr__(name: str):
    if name == "train":
        from deltafm.train.loop import train

        return train
    raise AttributeError(f"module 'deltafm.train' has no attribute {name!r}")
