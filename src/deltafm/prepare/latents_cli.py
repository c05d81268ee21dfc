"""``deltafm prepare-latents``: images (a folder or webdataset tars) -> VAE latent shards for training.

    deltafm prepare-latents --input /data/imagenet --vae sd-vae-ft-ema --image-size 256 --out data/in256
    deltafm prepare-latents --input 'data/shard-{000..099}.tar' --vae VAE --flip --out data/latents
    deltafm prepare-latents --input data/small --vae VAE --encoder dinov2-base --shard-size 1000 --out data/repa
    torchrun --standalone --nproc_per_node=8 -m deltafm prepare-latents --input ... --out ...

Each image is ADM-centre-cropped (:mod:`deltafm.prepare.crop`), encoded to its posterior (μ, σ) by the
VAE and written to ``OUT/shard-{k:05d}.safetensors`` (:func:`deltafm.data.latent_format.write_latent_shard`:
raw μ as ``latents``, σ as ``latents_std``, labels, the VAE's scale, shift and identity); train with
``deltafm train ... data.name=latents data.root=OUT``. For REPA, ``--encoder PATH`` (repeatable) also
stores each encoder's float16 patch tokens of the same crop on a G × G grid (``--encoder-grid G``, default
latent side // 2) as ``features.<name>``, and ``--keep-images`` the uint8 crop as ``images``
(:mod:`deltafm.prepare.features`). Inputs are enumerated once in a fixed order
(:mod:`deltafm.prepare.sources`), shard k holding items [k·S, (k+1)·S) (:mod:`deltafm.prepare.encode`).

**Resumable.** ``OUT/prepare.json`` records the settings; a restart with the same command skips the
shards on disk (each is written atomically) and encodes the rest; other settings are an error naming the
keys that differ (:mod:`deltafm.prepare.store`). A lock keeps a second job out of the folder.

**Under torchrun** the unfinished shards are dealt round-robin (on a fresh run shard k goes to rank
k mod N); a shard's bytes do not depend on the number of processes. Every rank enumerates the input and
loads the VAE; they check that they see the same items, rank 0 locks the folder and writes prepare.json,
then every rank writes its shards and rank 0 checks the result and prints the summary. A rank that meets
bad input stops, says so, and the job ends with that error once the other ranks have finished their
shards (nothing written is lost).

Bad input (no images, an unreadable image, a VAE folder that is not a diffusers AutoencoderKL, an
encoder folder that is not one, channels or image size the VAE cannot take, an output folder of another
run) prints one ``error:`` line and exits with status 2. Test hook: ``DELTAFM_PREPARE_STOP_AFTER=N``
stops a process after N shards (as a kill would).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltafm.errors import OneLineParser, RelayedError, UserError, run_command

__all__ = ["build_parser", "main"]

_DTYPES = ("float32", "float16", "bfloat16")
#: how long the ranks wait for each other (a rank that stopped on bad input waits for the others' shards)
_WAIT_S = 48 * 3600.0






def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="deltafm prepare-latents",
                description="Encode images (an image folder or webdataset tars) with a diffusers VAE into latent "
                            "shards (posterior mean and std) for `deltafm train data.name=latents`. Resumable: "
                            "rerun the same command after a kill. Runs under torchrun (one shard at a time per rank).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+",
                     help="image folder (ROOT/<class>/*, ROOT/train/<class>/*, or a plain folder of images), or "
                          "webdataset tars: a brace pattern 'data/shard-{000..009}.tar', a folder of *.tar, or files")
    src.add_argument("--dataset", default=None,
                     help="or a dataset deltafm loads by name (fashion-mnist, mnist, digits), with --root/--split")
    p.add_argument("--root", default=None, help="--dataset: its data folder (default: the dataset's)")
    p.add_argument("--split", default="train", help="--dataset: train or test (default train)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (save_pretrained), or a hub id")
    p.add_argument("--vae-subfolder", default=None, help="e.g. vae, for a full pipeline folder")
    p.add_argument("--image-size", type=int, default=256, help="side of the ADM centre crop (default 256)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="image channels (RGB or L; default: the VAE's in_channels)")
    p.add_argument("--flip", action="store_true", help="add the horizontal mirror of every image right after it")
    p.add_argument("--unlabelled", action="store_true", help="ignore classes and labels: every image gets label 0")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of classes recorded (default: class folders, or largest tar label + 1)")
    p.add_argument("--max-items", type=int, default=None, help="encode only the first N images (a quick trial)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable images out (listed in OUT/skipped.txt) instead of stopping")
    p.add_argument("--shard-size", type=int, default=10_000, help="items per shard (default 10000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call (default 64)")
    p.add_argument("--storage-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the stored moments (default float16)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype the VAE runs in (default float32)")
    p.add_argument("--scale-factor", type=float, default=None, help="override the VAE config's scaling_factor")
    p.add_argument("--shift-factor", type=float, default=None, help="override the VAE config's shift_factor")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--workers", type=int, default=None,
                   help="image decoding processes per rank (default: cores / ranks - 1, at most 8; 0: in-process)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch per rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    repa = p.add_argument_group("REPA targets (stored with the latents)")
    repa.add_argument("--encoder", action="append", default=None, metavar="PATH",
                      help="also store this encoder's float16 patch tokens of each crop as features.<folder name> "
                           "(a saved DINOv2 folder; repeatable). Large: G*G*D*2 bytes an item, use a smaller "
                           "--shard-size (e.g. 1000)")
    repa.add_argument("--encoder-grid", type=int, default=None, metavar="G",
                      help="token grid side G of the features (default: latent side // 2, the SiT/2 grid)")
    repa.add_argument("--keep-images", action="store_true",
                      help="also store each uint8 crop as 'images' (to run an encoder while training)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    from deltafm.prepare.store import PrepareError

    for flag, value, low in (("--image-size", args.image_size, 1), ("--shard-size", args.shard_size, 1),
                             ("--batch-size", args.batch_size, 1), ("--max-items", args.max_items, 1),
                             ("--num-classes", args.num_classes, 1), ("--workers", args.workers, 0),
                             ("--threads", args.threads, 1), ("--encoder-grid", args.encoder_grid, 1)):
        if value is not None and value < low:
            raise PrepareError(f"{flag} must be >= {low}, got {value}")
    if args.input is not None and (args.root is not None or args.split != "train"):
        raise PrepareError("--root and --split go with --dataset; --input names the image files itself")
    if args.dataset is not None and args.unlabelled:
        raise PrepareError("--unlabelled goes with --input; a dataset given by name keeps its labels")
    if args.encoder_grid is not None and not args.encoder:
        raise PrepareError("--encoder-grid goes with --encoder (the token grid of the stored features)")


def _device(name: str, world: int, local_rank: int) -> Any:
    """``--device`` (:func:`deltafm.train.distributed.device_option`), made the current CUDA device."""
    import torch

    from deltafm.prepare.store import PrepareError
    from deltafm.train.distributed import device_option

    dev = device_option(name, world, local_rank, PrepareError)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


# ----------------------------------------------------------------------------------------------- ranks




@dataclass
class _Plan:
    source: Any
    ae: Any
    store: Any
    job: Any
    settings: dict[str, Any]


def _settings(args: argparse.Namespace, source: Any, ae: Any, layout: Any, channels: int,
              extras: Any) -> dict[str, Any]:
    return dict(**extras.settings(),
        format="deltafm.prepare-latents", version=1, input=source.description, input_kind=source.kind,
        items_sha256=source.fingerprint(), images=len(source), count=layout.count, num_classes=source.num_classes,
        image_size=args.image_size, channels=channels, flip=args.flip, vae=ae.identity, vae_source=ae.source,
        scale_factor=ae.scale_factor, shift_factor=ae.shift_factor, latent_shape=list(ae.latent_shape(args.image_size)),
        shard_size=args.shard_size, storage_dtype=args.storage_dtype, vae_dtype=args.dtype)


def _open_input(args: argparse.Namespace) -> Any:
    """The enumerated input: files (``--input``) or a dataset loaded by name (``--dataset``)."""
    from deltafm.data.image_sources import DatasetSource, open_source, restrict

    if args.input is not None:
        return open_source(args.input, args.unlabelled, args.max_items, args.num_classes)
    from deltafm.data import load_dataset

    ds = load_dataset(args.dataset, root=args.root, split=args.split)
    return restrict(DatasetSource(ds, f"{ds.name}:{args.split}"), args.max_items, args.num_classes)


def _plan(args: argparse.Namespace, device: Any) -> _Plan:
    """Enumerate the input, load the VAE, check every option against them (writes nothing)."""
    import torch

    from deltafm.data.latent_format import shard_metadata
    from deltafm.prepare.encode import Layout, ShardJob
    from deltafm.prepare.features import load_extras_spec
    from deltafm.prepare.store import OutFolder, PrepareError
    from deltafm.train.distributed import available_cores
    from deltafm.vae.autoencoder import AutoencoderError, load_autoencoder

    if args.out.exists() and not args.out.is_dir():
        raise PrepareError(f"--out {args.out} is a file; give a folder for the latent shards")
    source = _open_input(args)
    ae = load_autoencoder(args.vae, subfolder=args.vae_subfolder, device=device, dtype=getattr(torch, args.dtype),
                          scale_factor=args.scale_factor, shift_factor=args.shift_factor)
    if ae.image_channels not in (1, 3):
        raise PrepareError(f"--vae {args.vae}: the VAE takes {ae.image_channels}-channel images; prepare-latents "
                           "reads RGB (3) or grayscale (1) images")
    channels = args.channels or ae.image_channels
    if channels != ae.image_channels:
        raise PrepareError(f"--channels {channels}: the VAE takes {ae.image_channels}-channel images (in_channels); "
                           f"pass --channels {ae.image_channels} or leave it out")
    try:
        ae.latent_shape(args.image_size)
    except AutoencoderError as e:
        near = ae.downsample * max(1, args.image_size // ae.downsample)
        raise PrepareError(f"--image-size: {e} (e.g. --image-size {near})") from None
    extras = load_extras_spec(args.encoder, args.encoder_grid, args.keep_images,
                              ae.latent_shape(args.image_size)[1], device)
    layout = Layout(len(source), args.flip, args.shard_size, args.batch_size)
    settings = _settings(args, source, ae, layout, channels, extras)
    meta = shard_metadata(ae.scale_factor, ae.shift_factor, source.num_classes, {
        "vae": ae.identity, "vae_source": ae.source, "image_size": str(args.image_size),
        "flip": str(args.flip).lower(), "source": source.description, **extras.metadata()})
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    workers = args.workers if args.workers is not None else min(8, max(0, available_cores() // local - 1))
    job = ShardJob(args.out, source, layout, ae, args.image_size, channels, meta,
                   getattr(torch, args.storage_dtype), args.skip_bad, workers, extras)
    store = OutFolder(args.out, settings, layout.num_shards, source.class_names)
    store.check()
    return _Plan(source, ae, store, job, settings)


def _same_input(plan: _Plan) -> None:
    """Every rank must have enumerated the same items and loaded the same VAE and encoders."""
    from deltafm.prepare.store import PrepareError
    from deltafm.train.distributed import all_gather_object

    mine = (plan.settings["items_sha256"], plan.settings["vae"], plan.settings["encoders"])
    seen = all_gather_object(mine)
    if any(s != seen[0] for s in seen):
        raise PrepareError("the ranks see different inputs, VAEs or encoders (is every path on a file system all "
                           "nodes see, unchanged while the job starts?)")


def _encode(plan: _Plan, args: argparse.Namespace, di: Any, mine: list[int]) -> None:
    """This rank's shards, with a progress bar on rank 0."""
    from deltafm.prepare.encode import encode_shards

    plan.job.out.mkdir(parents=True, exist_ok=True)  # rank 0 made it; another node may not see it yet
    bar = None
    if di.is_main and not args.no_progress:
        from tqdm.auto import tqdm

        todo = sum(len(plan.job.layout.shard_items(k)) for k in mine)
        count = plan.job.layout.count
        total, initial = (count, count - todo) if di.world_size == 1 else (todo, 0)
        who = f", rank 0 of {di.world_size}" if di.distributed else ""
        bar = tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True, desc=f"encoding{who}")
    try:
        encode_shards(plan.job, mine, None if bar is None else bar.update)
    except UserError as e:
        if di.distributed:  # the job's error line comes once every rank is done
            print(f"rank {di.rank} stopped: {e}\n(the other ranks finish their shards first)", file=sys.stderr,
                  flush=True)
        raise
    finally:
        if bar is not None:
            bar.close()


def _report(plan: _Plan, summary: Any, new: int) -> str:
    out, s = plan.store.root, summary
    shape = "×".join(map(str, s.item_shape))
    dtype = {"F16": "float16", "F32": "float32"}.get(s.dtype, s.dtype)
    lines = [f"wrote {s.items} latents ({shape}, {dtype}, posterior mean and std) in {s.shards} shard(s) to "
             f"{out} ({new} new)"]
    for name, item in plan.job.extras.shapes(plan.job.channels, plan.job.image_size).items():
        kind = "uint8 crops" if name == "images" else "float16 encoder tokens"
        lines.append(f"  {name}: {'×'.join(map(str, item))} {kind} an item")
    if s.upsampled:
        lines.append(f"  {s.upsampled} image(s) were smaller than {plan.job.image_size} px and were upsampled "
                     "by the crop")
    if s.skipped:
        lines.append(f"  {len(s.skipped)} unreadable image(s) skipped, listed in {out / 'skipped.txt'}")
    if plan.source.class_names is not None:
        lines.append(f"  class names: {out / 'classes.json'}")
    if plan.source.has_captions:
        lines.append(f"  captions: {out}/captions-*.json")
    lines.append(f"train on them:  deltafm train --preset <preset> data.name=latents data.root={out}")
    return "\n".join(lines)


def _prepare(args: argparse.Namespace, device: Any, di: Any) -> int:
    from deltafm.train.distributed import broadcast_object, together

    plan: _Plan = together(_plan, args, device)
    try:
        together(_same_input, plan)
        done: list[int] = broadcast_object(together(lambda: plan.store.open() if di.is_main else []))  # type: ignore[assignment]
        if done and di.is_main:
            print(f"resuming: {len(done)} of {plan.job.layout.num_shards} shards already in {args.out}",
                  file=sys.stderr, flush=True)
        finished = set(done)
        todo = [k for k in range(plan.job.layout.num_shards) if k not in finished]
        mine = todo[di.rank::di.world_size]
        together(_encode, plan, args, di, mine)
        summary = together(lambda: plan.store.finish(plan.source.has_captions) if di.is_main else None)
        if di.is_main:
            print(_report(plan, summary, len(todo)), flush=True)
    finally:
        plan.store.close()
        plan.source.close()
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch

    from deltafm.train.distributed import init_distributed, set_threads, shutdown_distributed

    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        _check_args(args)
        device = _device(args.device, world, local_rank)
    except UserError as e:  # the same on every rank (same argv): printed once
        raise RelayedError(str(e)) from None
    threads = torch.get_num_threads()
    if world > 1 and device.type == "cpu":
        set_threads(world, args.threads)
    elif args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        di = init_distributed("cpu", timeout_s=_WAIT_S)  # gloo: the ranks exchange small objects only
        ended = False
        try:
            rc, ended = _prepare(args, device, di), True
        finally:
            shutdown_distributed(wait=ended)
        return rc
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deltafm prepare-latents``; returns the exit status (2 with one ``error:`` line on bad
    input)."""
    return run_command(_run, build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
