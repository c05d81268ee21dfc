"""The output folder of ``deltafm prepare-latents``: settings, lock, finished shards, the final report.

::

    OUT/shard-00000.safetensors ...   latent shards (deltafm.data.latent_format, written atomically)
    OUT/captions-00000.json ...       captions of each shard's items (tar inputs with .txt members)
    OUT/prepare.json                  the settings of the run (written first, compared on every restart)
    OUT/classes.json                  class names in id order (class-folder inputs)
    OUT/skipped.txt                   unreadable images left out (--skip-bad), one per line, in item order
    OUT/prepare.lock                  held (flock) by the writing job's rank 0 while it runs

A shard file that exists is complete (atomic rename), so a restart with the same settings skips the
shards on disk and encodes the others; other settings are an error naming the keys that differ, never
a mix. Only the keys of :data:`COMPARED` count (the batch size, device and number of processes do not);
among them the REPA extras (``encoders``: name and identity of each ``--encoder``, ``encoder_grid``,
``keep_images``), which a prepare.json written before they existed lacks and reads as their defaults
(:data:`DEFAULTS`: no encoders, no images).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltafm.atomic import atomic_write, exclusive_lock
from deltafm.data.datasets import DataError
from deltafm.data.latent_format import check_shards_agree, shard_header
from deltafm.prepare.encode import captions_name, shard_name

__all__ = ["SETTINGS_FILE", "LOCK_FILE", "COMPARED", "DEFAULTS", "OutFolder", "Summary"]

SETTINGS_FILE = "prepare.json"
LOCK_FILE = "prepare.lock"
SKIPPED_FILE = "skipped.txt"
CLASSES_FILE = "classes.json"
#: settings that must be equal to resume into a folder
COMPARED = ("format", "version", "input", "input_kind", "items_sha256", "images", "count", "num_classes",
            "image_size", "channels", "flip", "vae", "scale_factor", "shift_factor", "shard_size",
            "storage_dtype", "vae_dtype", "encoders", "encoder_grid", "keep_images")
#: the value of a compared key that an older prepare.json lacks
DEFAULTS: dict[str, Any] = {"encoders": [], "encoder_grid": None, "keep_images": False}
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")


class PrepareError(DataError):
    """``deltafm prepare-latents`` cannot go on with this option or output folder (the message names the
    option or file and the fix). Input problems are :class:`deltafm.data.image_sources.ImageSourceError`."""


def _write_json(path: Path, obj: Any) -> None:
    text = (json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(text))
    except OSError as e:
        raise PrepareError(f"cannot write {path}: {e}") from None


@dataclass
class Summary:
    """What the folder holds after a run."""

    shards: int
    items: int
    item_shape: tuple[int, int, int]
    dtype: str
    upsampled: int
    skipped: list[str]


class OutFolder:
    """``OUT``: ``settings`` (JSON-able; :data:`COMPARED` keys are checked on reopen) for ``num_shards`` shards."""

    def __init__(self, root: Path, settings: dict[str, Any], num_shards: int,
                 class_names: list[str] | None = None) -> None:
        self.root = Path(root)
        self.settings = json.loads(json.dumps(settings, allow_nan=False))
        self.num_shards = num_shards
        self.class_names = class_names
        self._lock_fd: int | None = None

    def shard(self, k: int) -> Path:
        return self.root / shard_name(k)

    def differences(self) -> list[str]:
        """The compared settings that differ from ``OUT/prepare.json`` (empty when there is none)."""
        f = self.root / SETTINGS_FILE
        if not f.is_file():
            return []
        try:
            old = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError
        except (OSError, ValueError):
            return [f"{SETTINGS_FILE} (unreadable)"]
        old = {**DEFAULTS, **old}
        return [f"{k}: {json.dumps(old.get(k))} there, {json.dumps(self.settings.get(k))} now"
                for k in COMPARED if old.get(k) != self.settings.get(k)]

    def check(self) -> None:
        """Raise :class:`PrepareError` when OUT is not a folder, records other settings, or holds shards
        that are not this run's (changes nothing)."""
        if self.root.exists() and not self.root.is_dir():
            raise PrepareError(f"--out {self.root} is a file; give a folder for the latent shards")
        if not self.root.is_dir():
            return
        diff = self.differences()
        if diff:
            raise PrepareError(
                f"--out {self.root} holds latents prepared with other settings ({'; '.join(diff)}). Rerun with the "
                f"same settings to finish them, use another --out, or delete {self.root} to start over")
        has_settings = (self.root / SETTINGS_FILE).is_file()
        for p in sorted(self.root.glob("*.safetensors")):
            m = _SHARD_RE.match(p.name)
            if not has_settings or m is None or int(m.group(1)) >= self.num_shards:
                why = "no prepare.json" if not has_settings else "not a shard of this run"
                raise PrepareError(f"--out {self.root} holds {p.name} ({why}); the training loader reads every "
                                   "*.safetensors there: use an empty folder (or remove it)")

    def open(self) -> list[int]:
        """Check, create and lock OUT, remove debris of a killed run, write prepare.json (and
        classes.json); returns the finished shards."""
        self.check()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PrepareError(f"cannot create --out {self.root}: {e}") from None
        self._lock()
        self.check()  # again, now that no other writer can change it
        for p in self.root.glob("*.tmp"):
            p.unlink()
        if not (self.root / SETTINGS_FILE).is_file():
            _write_json(self.root / SETTINGS_FILE, self.settings)
        if self.class_names is not None:
            _write_json(self.root / CLASSES_FILE, self.class_names)
        return self.done()

    def done(self) -> list[int]:
        """Shards on disk."""
        return [k for k in range(self.num_shards) if self.shard(k).is_file()]

    def _lock(self) -> None:
        try:
            self._lock_fd = exclusive_lock(self.root / LOCK_FILE)
        except BlockingIOError:
            raise PrepareError(f"another prepare-latents job is writing into {self.root}; wait for it to end "
                               "or use another --out") from None

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def finish(self, captions: bool) -> Summary:
        """Check that every shard is there and that they agree, write ``skipped.txt``; the totals."""
        missing = [k for k in range(self.num_shards) if not self.shard(k).is_file()
                   or (captions and not (self.root / captions_name(k)).is_file())]
        if missing:
            raise PrepareError(f"{len(missing)} shard(s) missing in {self.root} after encoding (first: "
                               f"{shard_name(missing[0])}); is --out on a file system every node can see? Rerun "
                               "the same command to encode them")
        headers = [shard_header(self.shard(k)) for k in range(self.num_shards)]
        check_shards_agree(headers)
        skipped: list[str] = []
        for h in headers:
            skipped += json.loads(h.metadata.get("skipped", "[]"))
        skipped = list(dict.fromkeys(skipped))  # a flipped pair split over two shards names its image twice
        path = self.root / SKIPPED_FILE
        if skipped:
            text = "".join(f"{name}\n" for name in skipped).encode()
            atomic_write(path, lambda tmp: tmp.write_bytes(text))
        else:
            path.unlink(missing_ok=True)
        return Summary(self.num_shards, sum(h.count for h in headers), headers[0].item_shape, headers[0].dtype,
                       sum(int(h.metadata.get("upsampled", "0")) for h in headers), skipped)
