"""``deltafm sample``: a checkpoint -> images (PNG grids, ``samples.npz`` in the ADM layout, sample.json).

    deltafm sample --ckpt runs/X --num 50000 --solver sde --steps 50 --cfg 1.85 --out samples/X

Defaults come from the checkpoint's ``sample`` section. **Bad input first:** every option (given or from
the checkpoint) and ``--out`` (a folder or a place for one, with room for the samples) are checked before
any sampling; an error prints one ``error:`` line and exits with status 2, writing nothing.

**Streamed and resumable.** Each batch (:func:`deltafm.generate.generate_batches`) is written as a chunk
under ``OUT/.sampling/`` (:class:`deltafm.sample_store.ChunkStore`: atomic writes, the settings recorded),
so memory stays bounded by the batch size. After a kill the same command continues from the finished
chunks; other settings are an error, never a mix. At the end the grids, ``samples.npz`` (``latents.npz``
for latent models, assembled from the chunks without loading them) and sample.json are written
(:func:`deltafm.sample_store.write_final`) and the work folder removed: the bytes of an uninterrupted run.

**Which map.** ``--map none|to_fm|to_delta`` (``--lam`` for ``to_delta``), acting ``--correction always|guidance``
(``--bias-correction`` is the older spelling), as :meth:`deltafm.train.restore.LoadedModel.correction` builds it.

**Under torchrun** the chunks not on disk yet are dealt round-robin (``ChunkStore.deal``: on a fresh run
chunk k, images [k·B, (k+1)·B), goes to rank k mod N); a chunk's images depend on the seed and batch size
only, so any world size writes the same files. Rank 0 alone locks and opens the store and writes the final
files; the ranks agree over gloo, every check on every rank first.

Test hook: ``DELTAFM_SAMPLE_CHUNK_PAUSE=SECONDS`` sleeps after each chunk (to kill a run between chunks).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import shutil
import socket
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

from deltafm.correction import correction_window
from deltafm.errors import UserError, cli_error

__all__ = ["OptionError", "build_parser", "main"]

PAUSE_ENV = "DELTAFM_SAMPLE_CHUNK_PAUSE"
WORK_DIR = ".sampling"
MAPS = ("none", "to_fm", "to_delta")
#: --bias-correction (the config key's values) -> (--map, --correction)
_ALIAS = {"on": ("to_fm", "always"), "always": ("to_fm", "always"), "guidance": ("to_fm", "guidance"),
          "off": ("none", None)}


class OptionError(UserError, ValueError):
    """A ``deltafm sample`` option (or the checkpoint default it stands for) is out of range."""


class _Relayed(UserError):
    """A failure every rank of a torchrun job stops for; rank 0 prints it (once for the job)."""


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
    s.add_argument("--num", "--num-samples", dest="num", type=int, default=None,
                   help="number of samples (default: sample.num); under torchrun spell it --num-samples (torchrun "
                        "takes --num for an abbreviation of its --numa-binding)")
    s.add_argument("--solver", choices=list(SOLVERS), default=None)
    s.add_argument("--steps", type=int, default=None, help="solver steps (NFE per sample for euler/sde)")
    s.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale w >= 0: 1 = off, > 1 stronger, 0 <= w < 1 moves toward "
                        "the unconditional model (0 = unconditional samples)")
    s.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="apply guidance for t in [LO, HI] (t=0 noise, t=1 data)")
    s.add_argument("--map", choices=list(MAPS), default=None,
                   help="affine map of the velocity: none; to_fm, the ΔFM bias correction v_FM = (1-lam) v + "
                        "lam * u_bar at the trained lam with the stored mean target; to_delta, an FM model mapped "
                        "to the ΔFM optimum with --lam (default: the checkpoint's sample.bias_correction)")
    s.add_argument("--lam", type=float, default=None, help="lam of --map to_delta, 0 < lam < 1")
    s.add_argument("--correction", choices=["always", "guidance"], default=None,
                   help="where the map acts: at every t, or only for t in the guidance interval (the reference "
                        "code's rule); default: guidance if the checkpoint's sample.bias_correction says so")
    s.add_argument("--bias-correction", choices=list(_ALIAS), default=None,
                   help="the older spelling: on/always = --map to_fm, guidance = --map to_fm --correction "
                        "guidance, off = --map none")
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


def _check_map(args: argparse.Namespace) -> None:
    """``--map`` / ``--bias-correction`` / ``--lam`` combinations that cannot work (before the checkpoint is read)."""
    alias_map, alias_where = _ALIAS.get(args.bias_correction, (None, None))
    for flag, given, implied in (("--map", args.map, alias_map), ("--correction", args.correction, alias_where)):
        if given is not None and implied is not None and given != implied:
            means = f"--map {alias_map}" + (f" --correction {alias_where}" if alias_where else "")
            raise OptionError(f"{flag} {given} and --bias-correction {args.bias_correction} ({means}) disagree; "
                              "give one of them")
    if args.correction is not None and (args.map or alias_map) == "none":
        raise OptionError(f"--correction {args.correction} needs a map: --map to_fm or to_delta")
    if args.lam is not None:
        if args.map != "to_delta":
            raise OptionError(f"--lam is only for --map to_delta (got --map {args.map}); to_fm uses the lam the "
                              "model was trained with")
        if not (math.isfinite(args.lam) and 0.0 < args.lam < 1.0):
            raise OptionError(f"--lam must satisfy 0 < lam < 1 (the ΔFM optimum exists only for lam < 1), "
                              f"got {args.lam}")
    elif args.map == "to_delta":
        raise OptionError("--map to_delta needs --lam (0 < lam < 1): the lam of the ΔFM optimum to map to")


def _device(name: str, world: int = 1, local_rank: int = 0):
    """The torch device of ``--device``; under torchrun (world > 1) CUDA means ``cuda:LOCAL_RANK``."""
    import torch

    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise OptionError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name}: CUDA is not available here; use --device cpu")
        if world > 1:
            if dev.index is not None:
                raise OptionError(f"--device {name} under torchrun would put every rank on one GPU; use --device "
                                  "cuda or auto (each rank uses cuda:LOCAL_RANK)")
            dev = torch.device("cuda", local_rank)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise OptionError(f"--device {name!r}: use auto, cpu or cuda[:N]")
    return dev


def _note(message: str) -> None:  # on stderr, once per job (rank 0)
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- plan


#: what every rank agreed on before anything is written
_Plan = namedtuple("_Plan", "lm v correction store labels images")


def _resolve(args: argparse.Namespace, lm) -> dict[str, Any]:
    """Options with the checkpoint's defaults filled in, all checked."""
    sc = lm.config.sample
    given = _given(args)
    defaults = dict(num=sc.num, solver=sc.solver, steps=sc.steps, cfg=sc.cfg, interval=tuple(sc.interval),
                    seed=sc.seed, batch_size=sc.batch_size)
    v = {k: (given[k] if given[k] is not None else defaults[k]) for k in _KEYS}
    v["class_id"], v["threads"] = given["class_id"], given["threads"]
    alias_map, alias_where = _ALIAS.get(args.bias_correction, (None, None))
    try:  # the checkpoint's sample.bias_correction: off / always (true) / guidance
        off = correction_window(sc.bias_correction, (0.0, 1.0)) is None
    except ValueError as e:
        raise OptionError(f"the checkpoint's sample.bias_correction (default of --map): {e}") from None
    v["map"] = args.map or alias_map or ("none" if off else "to_fm")
    v["where"] = args.correction or alias_where or ("guidance" if sc.bias_correction == "guidance" else "always")
    v["lam"] = args.lam
    origin = {k: f"the checkpoint's sample.{k} (default of {_FLAGS[k]})"
              for k in _KEYS if given[k] is None}
    _check_values(v, origin, lm.data.num_classes)
    return v


def _correction(lm, v: dict[str, Any]):
    """The map as :meth:`LoadedModel.correction` builds it (None: the raw field)."""
    map_ = v["map"]
    if map_ == "none":
        return None
    if map_ == "to_fm" and lm.lam <= 0:
        _note("note: the model was trained with lam = 0 (plain FM): the map to_fm (bias correction) is the "
              "identity, skipped")
        return None
    try:
        return lm.correction(map_, v["lam"], interval=correction_window(v["where"], v["interval"]))
    except ValueError as e:
        raise OptionError(f"--map {map_}: {e}") from None


def _map_of(correction) -> dict[str, Any]:
    """The map actually applied, its lam and its t-window (None for both when the field is sampled as it is)."""
    if correction is None:
        return dict(map="none", map_lam=None, map_window=None)
    return dict(map=str(correction.direction), map_lam=float(correction.lam), map_window=list(correction.interval))


def _settings(lm, v: dict[str, Any], correction, device, amp: str, shape, dtype) -> dict[str, Any]:
    """What determines the samples: a resumed run must match it exactly (the world size does not count)."""
    manifest = lm.checkpoint / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return dict(format="deltafm.sample-chunks", version=2, checkpoint_manifest_sha256=digest, step=lm.step,
                images_seen=lm.images_seen, ema=lm.ema, kind=lm.data.kind, shape=list(shape), dtype=str(dtype),
                num=v["num"], solver=v["solver"], steps=v["steps"], cfg=v["cfg"], guidance_interval=list(v["interval"]),
                **_map_of(correction), lam=lm.lam, seed=v["seed"], batch_size=v["batch_size"],
                class_id=v["class_id"], amp=amp, device=device.type)


def _prepare(args: argparse.Namespace, device) -> _Plan:
    """Load the checkpoint, resolve and check every option, check the store and the disk (writes nothing)."""
    import numpy as np

    from deltafm.generate import labels_for
    from deltafm.sample_store import ChunkStore
    from deltafm.train.restore import load_for_sampling

    lm = load_for_sampling(args.ckpt, ema=args.ema, device=device)
    v = _resolve(args, lm)
    correction = _correction(lm, v)
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
    labels = labels_for(v["num"], lm.data.num_classes, v["class_id"])
    return _Plan(lm, v, correction, store, labels, images)


# ----------------------------------------------------------------------------------------------- ranks


def _together(fn, *args):
    """``fn(*args)`` on every rank; when it fails on any rank, every rank raises the first failure (which
    rank 0 prints, once for the job). A barrier too."""
    from deltafm.train.distributed import all_gather_object

    out, err = None, None
    try:
        out = fn(*args)
    except UserError as e:
        err = str(e)
    msgs = all_gather_object(err)
    for r, msg in enumerate(msgs):
        if msg is not None:
            raise _Relayed(msg if len(msgs) == 1 or r == 0 else f"rank {r}: {msg}") from None
    return out


def _visible(store, di, wait_s: float = 120.0) -> None:
    """A rank sees the store rank 0 opened (NFS may remember "no such file" for a minute: wait that out)."""
    deadline = time.monotonic() + wait_s
    while not di.is_main and not (store.root / "settings.json").is_file():
        if time.monotonic() > deadline:
            from deltafm.sample_store import SampleStoreError

            raise SampleStoreError(f"{store.root} is not visible from {socket.gethostname()} (rank {di.rank}): "
                                   "--out must be on a file system every node can see")
        with contextlib.suppress(OSError):
            os.listdir(store.root.parent)  # a fresh listing, for network file systems
        time.sleep(1.0)


def _open(store, di) -> list[int]:
    """Rank 0 locks and opens the store (settings, debris of a killed run); every rank gets the finished
    chunks' starts and checks that it sees the store."""
    from deltafm.train.distributed import broadcast_object

    warn = lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)  # noqa: E731
    done = broadcast_object(_together(lambda: store.open(warn) if di.is_main else []))
    _together(_visible, store, di)
    return list(done)


# ----------------------------------------------------------------------------------------------- run


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from deltafm.train.distributed import init_distributed, set_threads, shutdown_distributed

    try:
        _check_values(_given(args), {})
        _check_map(args)
    except OptionError as e:  # the same on every rank (same argv): printed once
        raise _Relayed(str(e)) from None
    _check_out(args.out)
    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(args.device, world, local_rank)
    threads = torch.get_num_threads()
    if world > 1 and device.type == "cpu":
        set_threads(world, args.threads)  # the cores split between the ranks of this machine
    elif args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if world > 1 and device.type == "cuda":
            torch.cuda.set_device(device)
        di = init_distributed("cpu")  # gloo: the ranks exchange small Python objects only, whatever the device
        ended = False
        try:
            rc, ended = _sample(args, device, di), True
        finally:
            shutdown_distributed(wait=ended)  # a no-op without a process group
        return rc
    finally:
        torch.set_num_threads(threads)


def _sample(args: argparse.Namespace, device, di) -> int:
    import torch

    from deltafm.sample_store import SampleStoreError, write_final

    plan = _together(_prepare, args, device)  # every check passed on every rank: from here on the job writes
    store, v = plan.store, plan.v
    try:
        done = _open(store, di)
        if done:
            _note(f"resuming: {sum(store.count(s) for s in done)} of {store.num} samples already in {store.root}")
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        _draw(plan, device, amp, store.deal(done, di.rank, di.world_size), di, progress=not args.no_progress)
        _together(lambda: None)  # every rank has written its chunks
        if not di.is_main:
            return 0
        missing = store.missing()
        if missing:
            raise SampleStoreError(f"{len(missing)} chunk(s) missing in {store.root} after sampling (first: images "
                                   f"{missing[0]}..); is --out on a file system every node can see? Rerun to "
                                   "sample them")
        maps = _map_of(plan.correction)
        lm = plan.lm
        meta = dict(checkpoint=str(lm.checkpoint), step=lm.step, images_seen=lm.images_seen, ema=lm.ema,
                    solver=v["solver"], steps=v["steps"], cfg=v["cfg"], guidance_interval=list(v["interval"]),
                    **maps, bias_correction=maps["map"] == "to_fm", lam=lm.lam, seed=v["seed"],
                    batch_size=v["batch_size"], class_id=v["class_id"], world_size=di.world_size)
        msg = write_final(store, args.out, plan.labels.numpy(), meta, plan.images, lm.data.num_classes,
                          lm.data.class_names)
        store.remove()  # while still holding the lock
    finally:
        store.close()
    print(msg)
    return 0


def _draw(plan: _Plan, device, amp, mine: list[int], di, progress: bool) -> None:
    """Sample this rank's chunks (starts ``mine``) and write each as it is done."""
    from deltafm.generate import generate_batches
    from deltafm.pixels import to_uint8_nhwc

    store, lm, v = plan.store, plan.lm, plan.v
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    bar = None
    if progress and di.is_main:
        from tqdm.auto import tqdm

        todo = sum(store.count(s) for s in mine)
        total, initial = (store.num, store.num - todo) if di.world_size == 1 else (todo, 0)
        who = f", rank 0 of {di.world_size}" if di.distributed else ""
        bar = tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True,
                   desc=f"sampling ({v['solver']}, {v['steps']} steps{who})")
    try:
        for start, x in generate_batches(
                lm.model, labels=plan.labels, shape=lm.shape, num_classes=lm.data.num_classes, solver=v["solver"],
                steps=v["steps"], cfg=v["cfg"], interval=v["interval"], correction=plan.correction, seed=v["seed"],
                batch_size=v["batch_size"], device=device, path=lm.objective.path, amp_dtype=amp,
                skip=set(store.starts).difference(mine)):
            if plan.images:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deltafm sample``; returns the exit status (2 with one ``error:`` line on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return _cmd_sample(args)
    except UserError as e:
        if not isinstance(e, _Relayed) or os.environ.get("RANK", "0") == "0":
            print(cli_error(e), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
