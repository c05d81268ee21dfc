"""Checkpoints without pickle: safetensors for tensors, JSON for everything else, verified by sha256.

Layout of a run folder ``OUT/checkpoints/``::

    step_00001500/
        model.safetensors     model weights (the raw module's state_dict)
        ema.safetensors       EMA weights (when EMA is on)
        state.safetensors     every other tensor of the training state (optimizer moments, RNG states,
                              the objective's running means for the bias correction ū, ...)
        state.json            the state's structure and scalars (step, images seen, sampler position,
                              resolved config, ...), tensors replaced by references into state.safetensors
        manifest.json         {"format": "deltafm.checkpoint", "version": 1, "files": {name: {sha256, bytes}}}
        COMPLETE              written last: the sha256 of manifest.json

Writing is atomic: everything goes into a temporary sibling folder, each file is fsync'ed, the COMPLETE
marker is written last, and the folder is renamed into place with ``os.replace`` (then the parent folder
is fsync'ed). A reader therefore sees either a whole checkpoint or none; a crash leaves at most a
``.tmp-*`` folder, which is ignored and cleaned up by the next save.

Validation (:func:`verify_checkpoint`): the COMPLETE marker must exist and match the manifest, and every
listed file must exist with the recorded size and sha256. ``find_latest_checkpoint`` walks the step
folders newest first and returns the first valid one, warning about each one it skips (truncated,
tampered, incomplete). Loading never unpickles: a ``torch.save``/pickle file is refused with a message.

Nested state: :func:`pack_state` turns a structure of dicts, lists, tuples, ints, floats, strings,
bools, None, tensors and numpy arrays into a JSON skeleton plus a flat dict of tensors;
:func:`unpack_state` inverts it exactly (dict keys that are not strings, such as the integer parameter
ids of an optimizer state, and tuples are preserved).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltafm.errors import UserError

__all__ = [
    "CheckpointError",
    "PickleCheckpointError",
    "Checkpoint",
    "FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "find_latest_checkpoint",
    "resolve_checkpoint",
    "set_aside_newer",
    "pack_state",
    "unpack_state",
    "step_dir_name",
]

FORMAT = "deltafm.checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, truncated, tampered with or of an unknown format."""


class PickleCheckpointError(CheckpointError):
    """The path is a pickle (``torch.save``) checkpoint, which deltafm refuses to load."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights, optional EMA weights and the unpacked training state."""

    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def config(self) -> dict[str, Any] | None:
        return self.state.get("config")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------------
# Nested state <-> (JSON skeleton, tensors)
# ----------------------------------------------------------------------------------------------------


def pack_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into a JSON-able skeleton and a flat ``{key: tensor}`` dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = path or "_"
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = path or "_"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x).copy())
            return {"__ndarray__": key}
        if isinstance(x, np.generic):
            return walk(x.item(), path)
        if isinstance(x, bool) or x is None or isinstance(x, str):
            return x
        if isinstance(x, int):
            return x
        if isinstance(x, float):
            if not np.isfinite(x):
                return {"__float__": repr(x)}
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not any(k.startswith("__") for k in x):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            items = []
            for i, (k, v) in enumerate(x.items()):
                if not isinstance(k, str | int | bool) and k is not None:
                    raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {path!r}")
                items.append([k, walk(v, f"{path}.#{i}")])
            return {"__dict__": items}
        raise TypeError(f"cannot store an object of type {type(x).__name__} at {path!r} in a checkpoint")

    return walk(obj, ""), tensors


def unpack_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {"__tensor__"}:
                return tensors[x["__tensor__"]]
            if set(x) == {"__ndarray__"}:
                return tensors[x["__ndarray__"]].numpy()
            if set(x) == {"__float__"}:
                return float(x["__float__"])
            if set(x) == {"__tuple__"}:
                return tuple(walk(v) for v in x["__tuple__"])
            if set(x) == {"__dict__"}:
                return {k: walk(v) for k, v in x["__dict__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _plain_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights)
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_checkpoint(
    root: str | Path,
    step: int,
    model: dict[str, torch.Tensor],
    state: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Atomically write checkpoint ``root/step_{step:08d}``; then keep only the newest ``keep_last``.

    An existing folder of the same step is replaced (it is first renamed to ``*.replaced-*`` and removed
    only after the new one is in place). Returns the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        skeleton, tensors = pack_state(state)
        files: dict[str, Path] = {}
        save_file(_plain_tensors(model), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        files["model.safetensors"] = tmp / "model.safetensors"
        if ema is not None:
            save_file(_plain_tensors(ema), str(tmp / "ema.safetensors"), metadata={"format": FORMAT})
            files["ema.safetensors"] = tmp / "ema.safetensors"
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": FORMAT})
        files["state.safetensors"] = tmp / "state.safetensors"
        _write_text(tmp / "state.json", json.dumps(skeleton, indent=1, allow_nan=False))
        files["state.json"] = tmp / "state.json"
        for p in files.values():
            _fsync_file(p)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": int(step),
            "files": {n: {"sha256": _sha256(p), "bytes": p.stat().st_size} for n, p in files.items()},
        }
        manifest_text = json.dumps(manifest, indent=1, sort_keys=True)
        _write_text(tmp / "manifest.json", manifest_text)
        _write_text(tmp / "COMPLETE", hashlib.sha256(manifest_text.encode()).hexdigest() + "\n")
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = root / f"{final.name}.replaced-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _cleanup(root, keep_last, current=final)
    return final


def _cleanup(root: Path, keep_last: int | None, current: Path) -> None:
    """Remove stale temporary folders of this process and all but the newest ``keep_last`` complete
    checkpoints at or below the current step (folders above it were set aside by a resume)."""
    for p in root.glob(f".tmp-*-{os.getpid()}"):
        shutil.rmtree(p, ignore_errors=True)
    if keep_last is None:
        return
    cur_step = _step_of(current)
    done = [p for p in list_checkpoints(root) if (p / "COMPLETE").is_file() and _step_of(p) <= cur_step]
    for p in done[:-keep_last] if keep_last > 0 else done:
        if p != current:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Finding and verifying
# ----------------------------------------------------------------------------------------------------


def _step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(root: str | Path) -> list[Path]:
    """Step folders in ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)), key=_step_of)


def _looks_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:2] == b"PK" or (len(head) >= 1 and head[0] == 0x80) or path.suffix.lower() in _PICKLE_SUFFIXES


def _pickle_error(path: Path) -> PickleCheckpointError:
    return PickleCheckpointError(
        f"refusing to load {path}: it is a pickle (torch.save) checkpoint, and unpickling a file can run "
        "arbitrary code. deltafm checkpoints are folders with model.safetensors, state.safetensors, "
        "state.json and a manifest. If you trust the file, convert its weights yourself, e.g. "
        "torch.load(path, weights_only=True) and safetensors.torch.save_file(state_dict, 'model.safetensors')."
    )


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint folder; return its manifest or raise :class:`CheckpointError` saying why."""
    path = Path(path)
    if path.is_file():
        if _looks_like_pickle(path):
            raise _pickle_error(path)
        raise CheckpointError(f"{path} is a file; a deltafm checkpoint is a folder (step_XXXXXXXX)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    marker, manifest_path = path / "COMPLETE", path / "manifest.json"
    if not marker.is_file() or not manifest_path.is_file():
        pickles = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _PICKLE_SUFFIXES]
        if pickles and not (path / "state.json").exists():
            raise _pickle_error(pickles[0])
        raise CheckpointError(f"checkpoint {path} is incomplete (no COMPLETE marker or manifest): "
                              "it was interrupted while being written")
    manifest_text = manifest_path.read_text(encoding="utf-8")
    if marker.read_text(encoding="utf-8").strip() != hashlib.sha256(manifest_text.encode()).hexdigest():
        raise CheckpointError(f"checkpoint {path}: manifest.json does not match its COMPLETE marker (modified)")
    try:
        manifest = json.loads(manifest_text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest.json ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {manifest.get('format')!r}")
    if int(manifest.get("version", 0)) > VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {manifest['version']} is newer than this "
                              f"deltafm reads ({VERSION}); upgrade deltafm")
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated or altered "
                                  f"({size} bytes, expected {info['bytes']})")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} fails its sha256 check (tampered or corrupted)")
    return manifest


def find_latest_checkpoint(root: str | Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest valid checkpoint in ``root`` (or None); invalid newer ones are skipped with a warning."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    for p in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            warn(f"skipping checkpoint {p.name}: {e}")
            continue
        return p
    return None


def set_aside_newer(root: str | Path, step: int, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Rename step folders newer than ``step`` (invalid ones skipped by a resume) to ``*.invalid-N`` so
    that new checkpoints of the resumed run do not mix with them. Nothing is deleted."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    moved = []
    for p in list_checkpoints(root):
        if _step_of(p) > step:
            n = 0
            while (dest := p.with_name(f"{p.name}.invalid-{n}")).exists():
                n += 1
            os.replace(p, dest)
            warn(f"set aside {p.name} (not used by this resume) as {dest.name}")
            moved.append(dest)
    return moved


def resolve_checkpoint(path: str | Path, warn: Callable[[str], None] | None = None) -> Path:
    """Turn a user path into a verified checkpoint folder.

    Accepts a step folder, a ``checkpoints/`` folder or a run folder (newest valid checkpoint inside), or
    a file inside a step folder. Raises :class:`CheckpointError` (or :class:`PickleCheckpointError`).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        if p.name in ("model.safetensors", "ema.safetensors", "state.json", "manifest.json", "COMPLETE"):
            p = p.parent
        else:
            if _looks_like_pickle(p):
                raise _pickle_error(p)
            raise CheckpointError(f"{p} is not a deltafm checkpoint (expected a step_XXXXXXXX folder)")
    if _STEP_RE.match(p.name) or (p / "manifest.json").exists() or (p / "COMPLETE").exists():
        verify_checkpoint(p)
        return p
    for root in (p / "checkpoints", p):
        if list_checkpoints(root):
            found = find_latest_checkpoint(root, warn)
            if found is None:
                raise CheckpointError(f"no valid checkpoint in {root} (all are incomplete or corrupted)")
            return found
    verify_checkpoint(p)  # raises with the reason (e.g. a folder holding only a pickle file)
    return p


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _load_tensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True,
                    weights_only: bool = False) -> Checkpoint:
    """Load a checkpoint folder (verified first unless ``verify=False``). ``weights_only`` skips the
    training state tensors (optimizer) but still reads state.json (config, mean target)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    model = _load_tensors(path / "model.safetensors", map_location)
    ema = _load_tensors(path / "ema.safetensors", map_location) if (path / "ema.safetensors").is_file() else None
    try:
        skeleton = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'state.json'}: {e}") from None
    tensors = _load_tensors(path / "state.safetensors", "cpu")
    if weights_only:
        skeleton = {k: v for k, v in skeleton.items() if k not in ("optimizer", "scaler")}
    return Checkpoint(path=path, model=model, ema=ema, state=unpack_state(skeleton, tensors))
