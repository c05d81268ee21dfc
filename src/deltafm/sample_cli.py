"""``deltafm sample``: a checkpoint -> images (PNG grids, ``samples.npz`` in the ADM layout, sample.json).

    deltafm sample --ckpt runs/X --num 50000 --solver sde --steps 50 --cfg 1.85 --out samples/X

Defaults come from the checkpoint's ``sample`` section. Which map (bias correction) and λ the checkpoint is
sampled with is decided by :meth:`deltafm.train.restore.LoadedModel.correction`.

**Bad input first.** Every option (given or taken from the checkpoint) is checked before any sampling:
finite ``--cfg`` >= 0, ``--steps`` >= the solver's fewest steps, the guidance interval, ``--num``,
``--batch-size``, ``--seed``, ``--class`` in range, ``--threads``, ``--device``, and the ``--out`` location
(a folder, or a place where one can be made, with room for the samples). Errors print one ``error:``
line and exit with status 2; nothing is written.

**Streamed and resumable.** Samples are drawn batch by batch (:func:`deltafm.generate.generate_batches`:
per-image noise seeds, SDE noise per batch start, so the images are those of an in-memory run) and each
batch is written as a chunk under ``OUT/.sampling/`` (:class:`deltafm.sample_store.ChunkStore`, atomic
writes, the settings recorded). Memory stays bounded by the batch size whatever ``--num``. After a kill,
the same command continues from the finished chunks; other settings are an error, never a mix. At the end
the grids are drawn from the first images, ``samples.npz`` (``latents.npz`` for latent models) is
assembled from the chunks without loading them (:func:`deltafm.sample_store.write_npz`), sample.json is
written and the work folder is removed. The final files are the same bytes as those of an uninterrupted run.

Test hook: the environment variable ``DELTAFM_SAMPLE_CHUNK_PAUSE=SECONDS`` sleeps after each chunk is
written (tests use it to kill a run between chunks).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from deltafm.errors import UserError, cli_error

__all__ = ["OptionError", "build_parser", "main"]

PAUSE_ENV = "DELTAFM_SAMPLE_CHUNK_PAUSE"
WORK_DIR = ".sampling"


class OptionError(UserError, ValueError):
    """A ``deltafm sample`` option (or the checkpoint default it stands for) is out of range."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one ``error:`` line (exit status 2) without the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from deltafm.solvers import SOLVERS

    s = _Parser(prog="deltafm sample",
                description="Sample from a checkpoint: PNG grid, per-class grids and samples.npz (ADM evaluation "
                            "layout), streamed to disk batch by batch; a killed run continues when the same "
                            "command is run again. Defaults come from the checkpoint's sample section.")
    s.add_argument("--ckpt", required=True, help="checkpoint folder, or a run folder (its newest valid checkpoint)")
    s.add_argument("--num", type=int, default=None, help="number of samples (default: sample.num)")
    s.add_argument("--solver", choices=list(SOLVERS), default=None)
    s.add_argument("--steps", type=int, default=None, help="solver steps (NFE per sample for euler/sde)")
    s.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale w >= 0: 1 = off, > 1 stronger, 0 <= w < 1 moves toward "
                        "the unconditional model (0 = unconditional samples)")
    s.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="apply guidance for t in [LO, HI] (t=0 noise, t=1 data)")
    s.add_argument("--bias-correction", choices=["on", "off"], default=None,
                   help="ΔFM correction v_FM = (1-lam) v + lam * u_bar with the stored mean target")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--class", dest="class_id", type=int, default=None, help="sample only this class")
    s.add_argument("--batch-size", type=int, default=None, help="samples per batch (and per chunk on disk)")
    ema = s.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=True, help="use EMA weights (default)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw model weights")
    s.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    s.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype for the model")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return s


# ----------------------------------------------------------------------------------------------- checks

_KEYS = ("num", "solver", "steps", "cfg", "interval", "seed", "batch_size")
_FLAGS = {"num": "--num", "solver": "--solver", "steps": "--steps", "cfg": "--cfg",
          "interval": "--guidance-interval", "seed": "--seed", "batch_size": "--batch-size",
          "class_id": "--class", "threads": "--threads"}


def _given(args: argparse.Namespace) -> dict[str, Any]:
    v = {k: getattr(args, k, None) for k in (*_KEYS, "class_id", "threads") if k != "interval"}
    v["interval"] = tuple(args.guidance_interval) if args.guidance_interval is not None else None
    return v


def _check_values(v: dict[str, Any], origin: dict[str, str], num_classes: int | None = None) -> None:
    """Raise :class:`OptionError` for the first value out of range (None values are not checked)."""
    from deltafm.solvers import get_solver

    def bad(key: str, why: str) -> OptionError:
        return OptionError(f"{origin.get(key, _FLAGS[key])} {why}")

    for key in ("num", "batch_size", "threads"):
        if v.get(key) is not None and v[key] < 1:
            raise bad(key, f"must be >= 1, got {v[key]}")
    if v.get("seed") is not None and v["seed"] < 0:
        raise bad("seed", f"must be >= 0, got {v['seed']}")
    if v.get("cfg") is not None and not (math.isfinite(v["cfg"]) and v["cfg"] >= 0):
        raise bad("cfg", f"must be a finite number >= 0 (w = 1: no guidance; w > 1: stronger; 0 <= w < 1 moves "
                         f"toward the unconditional model), got {v['cfg']}")
    if v.get("interval") is not None:
        lo, hi = v["interval"]
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
            raise bad("interval", f"must satisfy 0 <= LO <= HI <= 1 (t = 0 noise, t = 1 data), got {lo} {hi}")
    if v.get("solver") is not None:
        try:
            spec = get_solver(v["solver"])
        except ValueError as e:
            raise bad("solver", str(e)) from None
        if v.get("steps") is not None and v["steps"] < spec.min_steps:
            why = " (stochastic steps, then one deterministic step)" if spec.kind == "sde" else ""
            raise bad("steps", f"must be >= {spec.min_steps} for the {spec.name} solver{why}, got {v['steps']}")
    if v.get("steps") is not None and v["steps"] < 1:
        raise bad("steps", f"must be >= 1, got {v['steps']}")
    if v.get("class_id") is not None:
        if v["class_id"] < 0:
            raise bad("class_id", f"must be a class id >= 0, got {v['class_id']}")
        if num_classes is not None and v["class_id"] >= num_classes:
            raise bad("class_id", f"{v['class_id']} is out of range: the model has classes 0 .. {num_classes - 1}")


def _check_out(out: Path) -> None:
    """``--out`` must be a writable folder, or a path where one can be made."""
    if out.exists():
        if not out.is_dir():
            raise OptionError(f"--out {out} exists and is not a folder; give a folder for the samples")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OptionError(f"--out {out} is not writable")
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OptionError(f"--out {out} cannot be made: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"--out {out} cannot be made: {parent} is not writable")


def _check_out_names(out: Path, names: list[str], need_bytes: int) -> None:
    """The final files must not be folders, and the disk must have room for the chunks and the npz."""
    for name in names:
        if (out / name).exists() and not (out / name).is_file():
            raise OptionError(f"--out {out}: {out / name} is a folder; the samples are written to that name")
    if (out / WORK_DIR).exists() and not (out / WORK_DIR).is_dir():
        raise OptionError(f"--out {out}: {out / WORK_DIR} is a file; it is where unfinished chunks are kept")
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise OptionError(f"--out {out}: needs about {need_bytes / 2**30:.2f} GiB free (chunks, then the npz), "
                          f"only {free / 2**30:.2f} GiB are free")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise OptionError(f"--device {name!r}: use auto, cpu or cuda[:N]")
    return dev


# ----------------------------------------------------------------------------------------------- plan


def _resolve(args: argparse.Namespace, lm) -> dict[str, Any]:
    """Options with the checkpoint's defaults filled in, all checked."""
    sc = lm.config.sample
    given = _given(args)
    defaults = dict(num=sc.num, solver=sc.solver, steps=sc.steps, cfg=sc.cfg, interval=tuple(sc.interval),
                    seed=sc.seed, batch_size=sc.batch_size)
    v = {k: (given[k] if given[k] is not None else defaults[k]) for k in _KEYS}
    v["class_id"], v["threads"] = given["class_id"], given["threads"]
    v["bias_correction"] = (args.bias_correction == "on") if args.bias_correction is not None else sc.bias_correction
    origin = {k: f"the checkpoint's sample.{k} (default of {_FLAGS[k]})"
              for k in _KEYS if given[k] is None}
    _check_values(v, origin, lm.data.num_classes)
    return v


def _correction(lm, wanted: bool):
    if not wanted:
        return None
    if lm.lam <= 0:
        print("note: the model was trained with lam = 0 (plain FM): bias correction is the identity, skipped",
              file=sys.stderr)
        return None
    try:
        return lm.correction("to_fm")
    except ValueError as e:
        raise OptionError(f"--bias-correction: {e}") from None


def _settings(lm, v: dict[str, Any], correction, device, amp: str, shape, dtype) -> dict[str, Any]:
    """What determines the samples: a resumed run must match it exactly."""
    manifest = lm.checkpoint / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return dict(format="deltafm.sample-chunks", version=1, checkpoint_manifest_sha256=digest, step=lm.step,
                images_seen=lm.images_seen, ema=lm.ema, kind=lm.data.kind, shape=list(shape), dtype=str(dtype),
                num=v["num"], solver=v["solver"], steps=v["steps"], cfg=v["cfg"], guidance_interval=list(v["interval"]),
                bias_correction=correction is not None, lam=lm.lam, seed=v["seed"], batch_size=v["batch_size"],
                class_id=v["class_id"], amp=amp, device=device.type)


# ----------------------------------------------------------------------------------------------- run


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    _check_values(_given(args), {})
    _check_out(args.out)
    device = _device(args.device)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _sample(args, device)
    finally:
        torch.set_num_threads(threads)


def _sample(args: argparse.Namespace, device) -> int:
    import numpy as np
    import torch

    from deltafm.generate import labels_for
    from deltafm.sample_store import ChunkStore
    from deltafm.train.restore import load_for_sampling

    lm = load_for_sampling(args.ckpt, ema=args.ema, device=device)
    v = _resolve(args, lm)
    correction = _correction(lm, v["bias_correction"])
    images = lm.data.kind == "images"
    c, s = lm.data.channels, lm.data.image_size
    item_shape, dtype = ((s, s, c), np.uint8) if images else ((c, s, s), np.float32)
    present = [v["class_id"]] if v["class_id"] is not None else range(min(v["num"], lm.data.num_classes))
    names = (["grid.png", "samples.npz", "sample.json"] + [f"class_{k:03d}.png" for k in present]
             if images else ["latents.npz", "sample.json"])
    settings = _settings(lm, v, correction, device, args.amp, item_shape, np.dtype(dtype))
    store = ChunkStore(args.out / WORK_DIR, settings, v["num"], v["batch_size"], item_shape, dtype)
    store.check()
    have = sum(p.stat().st_size for p in store.root.glob("chunk_*.npy")) if store.root.is_dir() else 0
    item_bytes = int(np.prod(item_shape)) * np.dtype(dtype).itemsize
    _check_out_names(args.out, names, 2 * v["num"] * item_bytes - have + (1 << 20))
    # every check passed: from here on the run writes
    labels = labels_for(v["num"], lm.data.num_classes, v["class_id"])
    done = store.open(warn=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    try:
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        _draw(store, lm, v, labels, correction, device, amp, done, images, progress=not args.no_progress)
        meta = dict(checkpoint=str(lm.checkpoint), step=lm.step, images_seen=lm.images_seen, ema=lm.ema,
                    solver=v["solver"], steps=v["steps"], cfg=v["cfg"], guidance_interval=list(v["interval"]),
                    bias_correction=correction is not None, lam=lm.lam, seed=v["seed"], batch_size=v["batch_size"],
                    class_id=v["class_id"])
        msg = _finish(store, args.out, lm, labels, meta, images)
        store.remove()  # while still holding the lock
    finally:
        store.close()
    print(msg)
    return 0


def _draw(store, lm, v, labels, correction, device, amp, done: list[int], images: bool, progress: bool) -> None:
    """Sample the batches not on disk yet and write each as a chunk."""
    from deltafm.generate import generate_batches
    from deltafm.pixels import to_uint8_nhwc

    have = sum(store.count(s) for s in done)
    if done:
        print(f"resuming: {have} of {store.num} samples already in {store.root}", file=sys.stderr, flush=True)
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=store.num, initial=have, unit="img", dynamic_ncols=True,
                   desc=f"sampling ({v['solver']}, {v['steps']} steps)")
    try:
        for start, x in generate_batches(
                lm.model, labels=labels, shape=lm.shape, num_classes=lm.data.num_classes, solver=v["solver"],
                steps=v["steps"], cfg=v["cfg"], interval=v["interval"], correction=correction, seed=v["seed"],
                batch_size=v["batch_size"], device=device, path=lm.objective.path, amp_dtype=amp, skip=done):
            if images:
                store.write(start, to_uint8_nhwc(x))
            else:
                store.write(start, (x / lm.data.latent_scale + lm.data.latent_shift).numpy())
            if bar is not None:
                bar.update(x.shape[0])
            if pause > 0:
                time.sleep(pause)
    finally:
        if bar is not None:
            bar.close()


def _finish(store, out: Path, lm, labels, meta: dict[str, Any], images: bool) -> str:
    """Grids from the first images, the npz assembled from the chunks, then sample.json (written last)."""
    import numpy as np

    from deltafm.images import sample_info, write_grids, write_meta
    from deltafm.sample_store import write_npz

    lab = labels.numpy().astype(np.int64)
    n = store.num
    if not images:
        write_npz(out / "latents.npz", {"arr_0": (np.float32, (n, *store.item_shape), store.parts()),
                                        "labels": (np.int64, (n,), [lab])})
        write_meta(out / "sample.json", meta)
        return f"wrote {n} latents to {out / 'latents.npz'} (decode them with the VAE used to encode)"
    paths = write_grids(out, store.take, lab)
    write_npz(out / "samples.npz", {"arr_0": (np.uint8, (n, *store.item_shape), store.parts()),
                                    "labels": (np.int64, (n,), [lab])})
    write_meta(out / "sample.json", sample_info(meta, n, lm.data.num_classes, lm.data.class_names))
    return f"wrote {n} samples: {paths['grid']}, {out / 'samples.npz'} and {len(np.unique(lab))} class grid(s)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deltafm sample``; returns the exit status (2 with one ``error:`` line on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return _cmd_sample(args)
    except UserError as e:
        print(cli_error(e), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
