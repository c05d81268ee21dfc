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

**Text-to-image and multi-condition models** take ``--prompt`` / ``--prompts FILE`` or ``--condition NAME=VALUE``
/ ``--conditions FILE`` (with ``--guidance NAME=W``) instead of ``--class``; their rules and final files are
:mod:`deltafm.sample_conditions`. Class-conditional sampling is unchanged.

Test hook: ``DELTAFM_SAMPLE_CHUNK_PAUSE=SECONDS`` sleeps after each chunk (to kill a run between chunks).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
import sys
import time
from collections import namedtuple
from typing import Any

from deltafm.correction import correction_window
from deltafm.errors import RelayedError, run_command
from deltafm.sample_options import (
    _ALIAS,
    _FLAGS,
    _KEYS,
    MAPS,
    PAUSE_ENV,
    WORK_DIR,
    OptionError,
    _check_map,
    _check_out,
    _check_out_names,
    _check_values,
    _device,
    _given,
    _note,
    build_parser,
)

__all__ = ["MAPS", "PAUSE_ENV", "WORK_DIR", "OptionError", "build_parser", "main"]




# ----------------------------------------------------------------------------------------------- plan


#: what every rank agreed on before anything is written
_Plan = namedtuple("_Plan", "lm v correction store labels images decoder request")


def _resolve(args: argparse.Namespace, lm, num: int | None = None) -> dict[str, Any]:
    """Options with the checkpoint's defaults filled in (``num``: the default of ``--num`` when not the
    checkpoint's), all checked."""
    sc = lm.config.sample
    given = _given(args)
    defaults = dict(num=sc.num if num is None else num, solver=sc.solver, steps=sc.steps, cfg=sc.cfg,
                    interval=tuple(sc.interval), seed=sc.seed, batch_size=sc.batch_size)
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


def _settings(lm, v: dict[str, Any], correction, device, amp: str, shape, dtype, decoder,
              request=None, compiled: bool = False) -> dict[str, Any]:
    """What determines the samples: a resumed run must match it exactly (the world size does not count); for
    text and multi-condition models also the prompts' (groups') digest and the guidance weights."""
    manifest = lm.checkpoint / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return dict(format="deltafm.sample-chunks", version=2, checkpoint_manifest_sha256=digest, step=lm.step,
                images_seen=lm.images_seen, ema=lm.ema, kind=lm.data.kind, shape=list(shape), dtype=str(dtype),
                num=v["num"], solver=v["solver"], steps=v["steps"], cfg=v["cfg"], guidance_interval=list(v["interval"]),
                **_map_of(correction), lam=lm.lam, seed=v["seed"], batch_size=v["batch_size"],
                class_id=v["class_id"], amp=amp, device=device.type,
                decoder=None if decoder is None else decoder.identity,
                **({} if request is None else request.settings(v["cfg"])),
                **({"compile": True} if compiled else {}))  # absent when off: older stores still resume


def _prepare(args: argparse.Namespace, device) -> _Plan:
    """Load the checkpoint, resolve and check every option, check the store and the disk (writes nothing)."""
    import numpy as np

    from deltafm.generate import labels_for
    from deltafm.sample_conditions import PER_PROMPT, read_given, resolve_request
    from deltafm.sample_store import ChunkStore
    from deltafm.train.restore import load_for_sampling

    given = read_given(args)  # the prompt / condition files and their syntax, before the checkpoint is read
    lm = load_for_sampling(args.ckpt, ema=args.ema, device=device)
    request = resolve_request(args, lm, given)
    v = _resolve(args, lm, None if request is None else request.count * (args.per_prompt or PER_PROMPT))
    correction = _correction(lm, v)
    decoder = _decoder(args, lm, device)
    images = lm.data.kind == "images" or decoder is not None
    c, s = lm.data.channels, lm.data.image_size
    if decoder is not None:
        c, s = decoder.image_channels, s * decoder.downsample
    item_shape, dtype = ((s, s, c), np.uint8) if images else ((c, s, s), np.float32)
    present = [v["class_id"]] if v["class_id"] is not None else range(min(v["num"], lm.data.num_classes))
    names = (["grid.png", "samples.npz", "sample.json"] + [f"class_{k:03d}.png" for k in present]
             if images else ["latents.npz", "sample.json"])
    if request is not None and images:
        names = names[:3]  # no per-class grids
    settings = _settings(lm, v, correction, device, args.amp, item_shape, np.dtype(dtype), decoder, request,
                         compiled=args.compile)
    store = ChunkStore(args.out / WORK_DIR, settings, v["num"], v["batch_size"], item_shape, dtype)
    store.check()
    have = sum(p.stat().st_size for p in store.root.glob("chunk_*.npy")) if store.root.is_dir() else 0
    item_bytes = int(np.prod(item_shape)) * np.dtype(dtype).itemsize
    _check_out_names(args.out, names, 2 * v["num"] * item_bytes - have + (1 << 20))
    labels = labels_for(v["num"], lm.data.num_classes, v["class_id"]) if request is None else request.labels(v["num"])
    return _Plan(lm, v, correction, store, labels, images, decoder, request)


def _decoder(args: argparse.Namespace, lm, device):
    """The VAE that turns a latent model's samples into images (:func:`deltafm.vae.decoding.find_decoder`),
    None for pixel models and with ``--no-decode``; a latent model without a usable VAE is an error."""
    if lm.data.kind != "latents" or args.no_decode:
        if args.vae is not None:
            why = "--no-decode writes latents" if args.no_decode else "the model works on pixels"
            raise OptionError(f"--vae {args.vae}: nothing to decode ({why})")
        return None
    from deltafm.vae.decoding import find_decoder

    decoder, why = find_decoder(lm.data.vae_source, lm.data.vae_identity, args.vae, device)
    if decoder is None:
        raise OptionError(f"cannot decode the samples: {why}; or pass --no-decode to write latents.npz")
    if decoder.latent_channels != lm.data.channels:
        raise OptionError(f"--vae {decoder.source}: it has {decoder.latent_channels} latent channels, the model "
                          f"{lm.data.channels}")
    return decoder


# ----------------------------------------------------------------------------------------------- ranks




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
    from deltafm.train.distributed import broadcast_object, together

    warn = lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)  # noqa: E731
    done = broadcast_object(together(lambda: store.open(warn) if di.is_main else []))
    together(_visible, store, di)
    return list(done)


# ----------------------------------------------------------------------------------------------- run


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from deltafm.train.distributed import init_distributed, set_threads, shutdown_distributed

    try:
        _check_values(_given(args), {})
        _check_map(args)
    except OptionError as e:  # the same on every rank (same argv): printed once
        raise RelayedError(str(e)) from None
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
    from deltafm.train.distributed import together

    plan = together(_prepare, args, device)  # every check passed on every rank: from here on the job writes
    store, v = plan.store, plan.v
    try:
        done = _open(store, di)
        if done:
            _note(f"resuming: {sum(store.count(s) for s in done)} of {store.num} samples already in {store.root}")
        amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16-compute": None}[args.amp]
        _draw(plan, device, amp, store.deal(done, di.rank, di.world_size), di, progress=not args.no_progress,
              bf16_compute=args.amp == "bf16-compute", compiled=args.compile)
        together(lambda: None)  # every rank has written its chunks
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
                    batch_size=v["batch_size"], class_id=v["class_id"], world_size=di.world_size,
                    **({} if plan.decoder is None else dict(vae=plan.decoder.identity, vae_source=plan.decoder.source)),
                    **({"compile": True} if args.compile else {}))
        if plan.request is None:
            msg = write_final(store, args.out, plan.labels.numpy(), meta, plan.images, lm.data.num_classes,
                              lm.data.class_names)
        else:
            from deltafm.sample_conditions import write_conditioned

            msg = write_conditioned(store, args.out, plan.request, meta, plan.images)
        store.remove()  # while still holding the lock
    finally:
        store.close()
    print(msg)
    return 0


def _draw(plan: _Plan, device, amp, mine: list[int], di, progress: bool, bf16_compute: bool = False,
          compiled: bool = False) -> None:
    """Sample this rank's chunks (starts ``mine``) and write each as it is done."""
    from deltafm.generate import generate_batches
    from deltafm.pixels import to_uint8_nhwc
    from deltafm.vae.decoding import decode_uint8

    store, lm, v = plan.store, plan.lm, plan.v
    model = lm.model
    if bf16_compute:  # a bf16 copy of the weights, called without autocast (outputs cast back to fp32)
        from deltafm.train.bf16_compute import Bf16Compute

        model = Bf16Compute(lm.model).eval()
    if compiled:  # compiled on the first batch (and once more for a smaller last batch)
        import torch

        model = torch.compile(model, dynamic=False)
        if di.is_main:
            _note("note: --compile: the first batch compiles the model (a minute or more on a CPU), later ones run "
                  "faster")
    cfg = v["cfg"] if plan.request is None else plan.request.cfg(v["cfg"])
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
                model, labels=plan.labels, shape=lm.shape, num_classes=lm.data.num_classes, solver=v["solver"],
                steps=v["steps"], cfg=cfg, interval=v["interval"], correction=plan.correction, seed=v["seed"],
                batch_size=v["batch_size"], device=device, path=lm.objective.path, amp_dtype=amp,
                skip=set(store.starts).difference(mine)):
            if plan.decoder is not None:
                store.write(start, decode_uint8(plan.decoder, x))
            elif plan.images:
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
    return run_command(_cmd_sample, build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
