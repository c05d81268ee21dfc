"""Options of ``deltafm sample``: the parser and every check that needs no checkpoint or a loaded one only
for its numbers (bad input is an :class:`OptionError`: one ``error:`` line, exit status 2, nothing written)."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from deltafm.errors import OneLineParser, UserError

__all__ = ["OptionError", "build_parser", "MAPS", "WORK_DIR", "PAUSE_ENV"]

PAUSE_ENV = "DELTAFM_SAMPLE_CHUNK_PAUSE"
WORK_DIR = ".sampling"
MAPS = ("none", "to_fm", "to_delta")
#: --bias-correction (the config key's values) -> (--map, --correction)
_ALIAS = {"on": ("to_fm", "always"), "always": ("to_fm", "always"), "guidance": ("to_fm", "guidance"),
          "off": ("none", None)}


class OptionError(UserError, ValueError):
    """A ``deltafm sample`` option (or the checkpoint default it stands for) is out of range."""




def build_parser() -> argparse.ArgumentParser:
    from deltafm.solvers import SOLVERS

    s = OneLineParser(prog="deltafm sample",
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
    s.add_argument("--amp", choices=["none", "bf16", "fp16", "bf16-compute"], default="none",
                   help="autocast dtype for the model; bf16-compute: run a bf16 copy of the weights without autocast "
                        "(faster on CPUs whose autocast casts cost; deltafm.train.bf16_compute)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model (dynamic=False) before sampling: the first batch compiles (about a "
                        "minute for SiT-B/2 on 2 CPU cores), later batches run faster (benchmarks/RESULTS.md); not "
                        "bit-equal to eager")
    s.add_argument("--vae", default=None,
                   help="latent models: the VAE folder that decodes the samples (default: the one recorded in the "
                        "checkpoint); it must be the VAE that encoded the training latents")
    s.add_argument("--no-decode", action="store_true",
                   help="latent models: write the raw latents (latents.npz) instead of decoded images")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _conditioned_options(s)
    return s


def _conditioned_options(s: argparse.ArgumentParser) -> None:
    """Options of text-to-image and multi-condition models (:mod:`deltafm.sample_conditions`)."""
    c = s.add_argument_group("text and multi-condition models",
                             "sample i gets prompt (condition line) i mod P; --num defaults to P x --per-prompt")
    c.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text models: a prompt (repeatable, in order)")
    c.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="text models: a file of prompts, one a line (blank lines and lines starting with # skipped)")
    c.add_argument("--per-prompt", type=int, default=None, metavar="N",
                   help="samples per prompt (condition line) when --num is not given (default 4)")
    c.add_argument("--text-encoder", default=None, metavar="DIR",
                   help="text models: the text encoder folder (default: the one recorded in the checkpoint); it "
                        "must be the encoder the model was trained with")
    c.add_argument("--condition", action="append", default=None, metavar="NAME=VALUE",
                   help="multi-condition models: a value every sample gets (repeatable; parts not given are null)")
    c.add_argument("--conditions", type=Path, default=None, metavar="FILE",
                   help="multi-condition models: a file of condition groups, one a line (shape=circle colour=red)")
    c.add_argument("--guidance", action="append", default=None, metavar="NAME=W",
                   help="multi-condition models: the CFG weight of one part (repeatable; compositional CFG; parts "
                        "not named use the checkpoint's conditioning.guidance, else --cfg)")


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
    """The torch device of ``--device`` (:func:`deltafm.train.distributed.device_option`)."""
    from deltafm.train.distributed import device_option

    return device_option(name, world, local_rank, OptionError)


def _note(message: str) -> None:  # on stderr, once per job (rank 0)
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
