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

Writing is atomic: everything goes into a temporary sibling folder ``.tmp-step_X-PID``, each file is
fsync'ed, the COMPLETE marker is written last, and the folder is renamed into place with ``os.replace``
(then the parent folder is fsync'ed). Pruning (``keep_last``) first renames a folder to ``.del-step_X-PID``
and only then deletes it. A reader therefore sees whole checkpoints or none; a crash leaves at most a
``.tmp-*`` or ``.del-*`` folder (:data:`DEBRIS_PREFIXES`), never a half written or half deleted
``step_*`` folder; the next run removes such debris (:mod:`deltafm.train.runfolder`).

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
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltafm.atomic import fsync_dir, fsync_file
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
    "discard",
    "pack_state",
    "unpack_state",
    "step_dir_name",
    "step_of",
    "DEBRIS_PREFIXES",
    "REPLACED_TAG",
    "TEST_PAUSE_ENV",
]

FORMAT = "deltafm.checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
#: names of folders a writer makes on the way (being written, being deleted): debris when it died
DEBRIS_PREFIXES = (".tmp-", ".del-")
#: ``step_X.replaced-PID``: the old folder of a step that is being written again
REPLACED_TAG = ".replaced-"
#: test hook (fault injection), see :func:`_test_pause`; never set it outside tests
TEST_PAUSE_ENV = "DELTAFM_TEST_PAUSE"


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

    An existing folder of the same step is replaced: it is first renamed to ``step_X.replaced-PID`` and
    removed only after the new one is in place (a crash in between leaves it to be restored by
    :func:`deltafm.train.runfolder.remove_debris`). Returns the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_files(tmp, step, model, state, ema)
        _test_pause("complete", step)
        old = None
        if final.exists():
            old = root / f"{final.name}{REPLACED_TAG}{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        _test_pause("placed", step)
        if old is not None:
            discard(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep_last, current=final)
    return final


def _write_files(tmp: Path, step: int, model: dict[str, torch.Tensor], state: dict[str, Any],
                 ema: dict[str, torch.Tensor] | None) -> None:
    """The files of a checkpoint, then its manifest, then COMPLETE (each fsync'ed) into ``tmp``."""
    skeleton, tensors = pack_state(state)
    files: dict[str, Path] = {}
    save_file(_plain_tensors(model), str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    files["model.safetensors"] = tmp / "model.safetensors"
    _test_pause("files", step)
    if ema is not None:
        save_file(_plain_tensors(ema), str(tmp / "ema.safetensors"), metadata={"format": FORMAT})
        files["ema.safetensors"] = tmp / "ema.safetensors"
    save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": FORMAT})
    files["state.safetensors"] = tmp / "state.safetensors"
    _write_text(tmp / "state.json", json.dumps(skeleton, indent=1, allow_nan=False))
    files["state.json"] = tmp / "state.json"
    for p in files.values():
        fsync_file(p)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "files": {n: {"sha256": _sha256(p), "bytes": p.stat().st_size} for n, p in files.items()},
    }
    manifest_text = json.dumps(manifest, indent=1, sort_keys=True)
    _write_text(tmp / "manifest.json", manifest_text)
    _write_text(tmp / "COMPLETE", hashlib.sha256(manifest_text.encode()).hexdigest() + "\n")
    fsync_dir(tmp)


def discard(path: Path, step: int = -1) -> None:
    """Delete a folder so that no crash leaves it half deleted under its name: rename it to
    ``.del-NAME-PID`` first (atomic), then delete that."""
    gone = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, gone)
    fsync_dir(path.parent)
    _test_pause("prune", step)
    files = sorted(p for p in gone.iterdir() if p.is_file())
    if files:
        files[0].unlink()
        _test_pause("prune-partial", step)
    shutil.rmtree(gone, ignore_errors=True)


def _prune(root: Path, keep_last: int | None, current: Path) -> None:
    """Discard all but the newest ``keep_last`` complete checkpoints at or below the current step
    (folders above it were set aside by a resume)."""
    if keep_last is None:
        return
    cur_step = step_of(current)
    done = [p for p in list_checkpoints(root) if (p / "COMPLETE").is_file() and step_of(p) <= cur_step]
    for p in done[:-keep_last] if keep_last > 0 else done:
        if p != current:
            discard(p, cur_step)


def _test_pause(phase: str, step: int) -> None:
    """Test hook (fault injection). With ``DELTAFM_TEST_PAUSE=PHASE[@STEP][,...]`` set, print
    ``deltafm-test-pause PHASE STEP`` to stderr and sleep (10 min) so that a test can SIGKILL the writer
    there. Phases: ``files``, ``complete`` (not yet renamed), ``placed``, ``prune`` (renamed to ``.del-*``),
    ``prune-partial``. Unset, as always outside tests, it does nothing."""
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, at = item.strip().partition("@")
        if name == phase and (not at or int(at) == step):
            print(f"deltafm-test-pause {phase} {step}", file=sys.stderr, flush=True)
            time.sleep(600)


# ----------------------------------------------------------------------------------------------------
# Finding and verifying
# ----------------------------------------------------------------------------------------------------


def step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(root: str | Path) -> list[Path]:
    """Step folders in ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)), key=step_of)


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
