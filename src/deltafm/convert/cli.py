"""``deltafm convert``: a public SiT / REPA / ΔFM-reference ``.pt`` -> a deltafm checkpoint folder.

    deltafm convert --from sit --ckpt SiT-XL-2-256x256.pt --out runs/sit-xl2
    deltafm convert --from deltafm-ref --ckpt 0400000.pt --interference imnet256_interference_vector.pt \\
        --out runs/deltafm-ref-xl2

The file is read with ``torch.load(weights_only=True)`` (:mod:`deltafm.convert.reader`: a pickle that needs
code is refused without running it); the weights are mapped by :mod:`deltafm.convert.layouts` so that the
converted model follows deltafm's time convention (t = 0 noise, t = 1 data; for REPA and the ΔFM reference
``ours(x, t, y) = −ref(x, 1 − t, y)``). The result, ``OUT/checkpoints/step_X`` (X = the reference's step),
loads with :func:`deltafm.train.restore.load_for_sampling` and ``deltafm sample --ckpt OUT``. Next to it:
``OUT/convert.json`` (source, layout, the transforms applied, the trainer's args) and, for REPA layouts,
``OUT/reference_projectors.safetensors`` (the projector heads, not needed to sample).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deltafm.errors import CLI_ERRORS, cli_error

from .layouts import LAYOUTS, Architecture, Converted, convert_state_dict
from .reader import ConvertError, args_dict, pick_weights, read_torch_file

__all__ = ["build_parser", "main", "convert_checkpoint", "model_spec"]

SD_VAE_SCALE = 0.18215


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltafm convert",
                                description="Convert a public SiT / REPA / ΔFM-reference checkpoint (.pt) into a "
                                            "deltafm checkpoint folder (time convention t = 0 noise, t = 1 data).")
    p.add_argument("--from", dest="layout", required=True, choices=list(LAYOUTS), help="source layout")
    p.add_argument("--ckpt", required=True, type=Path, help="the .pt file (torch.save)")
    p.add_argument("--out", required=True, type=Path, help="run folder to write (OUT/checkpoints/step_X)")
    p.add_argument("--model", default=None, help="deltafm model name, e.g. SiT-XL/2 (default: from the shapes)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (not readable from the shapes; "
                                                                 "default: the model preset's)")
    p.add_argument("--num-classes", type=int, default=None, help="real classes (default: class table rows - 1)")
    p.add_argument("--image-size", type=int, default=None, help="latent side (checked against the weights)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of the file (default ema)")
    p.add_argument("--interference", type=Path, default=None,
                   help="the ΔFM reference's stored mean vector (.pt, C x H x W): stored as the mean target ū")
    p.add_argument("--lam", type=float, default=None,
                   help="λ the model was trained with (default: args.contrastive_weight of a ΔFM-reference "
                        "checkpoint, 0.05 when it has none, 0 for sit and repa)")
    p.add_argument("--latent-scale", type=float, default=SD_VAE_SCALE, help="VAE latent scale (SD-VAE: 0.18215)")
    p.add_argument("--vae", default=None,
                   help="the VAE the model was trained with (diffusers folder, e.g. sd-vae-ft-ema), recorded so "
                        "`deltafm sample` decodes to images; read here to record its identity")
    return p


def model_spec(arch: Architecture, name: str | None, num_heads: int | None) -> tuple[str, dict[str, Any]]:
    """(model name, kwargs) of deltafm's registry that build this architecture."""
    from deltafm.models.registry import list_models, model_preset

    want = dict(depth=arch.depth, hidden_size=arch.hidden_size, patch_size=arch.patch_size)
    if name is None:
        fits = [n for n in list_models() if n.startswith("SiT-")
                and all(model_preset(n)[1].get(k) == v for k, v in want.items())]
        name = fits[0] if fits else f"SiT-S/{arch.patch_size}" if arch.patch_size in (2, 4, 8) else "SiT-S/2"
    try:
        cls, preset = model_preset(name)
    except ValueError as e:
        raise ConvertError(f"--model: {e}") from None
    if cls.__name__ != "SiT":
        raise ConvertError(f"--model {name} is not a SiT")
    kw: dict[str, Any] = {k: v for k, v in want.items() if preset.get(k) != v}
    if kw and num_heads is None:
        raise ConvertError(f"the weights (depth {arch.depth}, hidden {arch.hidden_size}, patch {arch.patch_size}) "
                           f"are not {name}; give --num-heads (and --model) for this size")
    if num_heads is not None and num_heads != preset.get("num_heads"):
        kw["num_heads"] = num_heads
    if abs(arch.mlp_ratio - 4.0) > 1e-9:
        kw["mlp_ratio"] = arch.mlp_ratio
    if arch.freq_dim != 256:
        kw["freq_dim"] = arch.freq_dim
    heads = kw.get("num_heads", preset.get("num_heads"))
    if arch.hidden_size % heads:
        raise ConvertError(f"hidden size {arch.hidden_size} is not divisible by {heads} heads")
    return _canonical(name), kw


def _canonical(name: str) -> str:
    from deltafm.models.registry import list_models

    return next(n for n in list_models() if n.lower() == name.lower())


def _num_classes(conv: Converted, given: int | None) -> int:
    """Real classes; a table without the CFG row gets a zero null row (the model then has no unconditional)."""
    rows = conv.arch.table_rows
    k = rows - 1 if given is None else given
    if rows == k + 1:
        return k
    if rows == k:
        table = conv.state_dict["y_embedder.table.weight"]
        conv.state_dict["y_embedder.table.weight"] = torch.cat([table, torch.zeros_like(table[:1])])
        conv.notes.append("the class table had no null row (trained without label dropout): added a zero row; "
                          "classifier-free guidance is meaningless for this model")
        return k
    raise ConvertError(f"--num-classes {given} does not fit a class table of {rows} rows")


def _lam(layout: str, ref_args: dict[str, Any], given: float | None) -> float:
    if given is not None:
        if not 0.0 <= given < 1.0:
            raise ConvertError(f"--lam must satisfy 0 <= lam < 1, got {given}")
        return float(given)
    if layout != "deltafm-ref":
        return 0.0
    if ref_args.get("loss_type", "contrastive") != "contrastive":
        return 0.0
    return float(ref_args.get("contrastive_weight", 0.05))


def _config(layout: str, name: str, kw: dict[str, Any], lam: float, ref_args: dict[str, Any], step: int,
            has_mean: bool) -> dict[str, Any]:
    path = _path_name(ref_args)
    return {
        "model": {"name": name, "kwargs": kw},
        "data": {"name": "latents", "root": None},
        "objective": {"path": path, "lam": lam, "negatives": "uniform" if lam > 0 else "none",
                      "label_dropout": float(ref_args.get("cfg_prob", 0.1)), "negative_time": "own"},
        "train": {"steps": max(1, step), "batch_size": int(ref_args.get("batch_size", 256)), "ema_decay": 0.9999},
        "sample": _sample_section(layout, has_mean and lam > 0),
    }


def _path_name(ref_args: dict[str, Any]) -> str:
    """The path of the trainer's ``path_type`` (REPA: linear/cosine; SiT: Linear/GVP/VP), in our names."""
    name = str(ref_args.get("path_type", "linear")).lower()
    return {"gvp": "cosine"}.get(name, name)


def _sample_section(layout: str, corrected: bool) -> dict[str, Any]:
    """The reference evaluation: 50-step SDE; ΔFM-reference with its mean vector: CFG 1.85 on t in
    [0.35, 1] (its guidance_high 0.65 in reference time) with the correction where guidance acts."""
    if layout == "deltafm-ref" and corrected:
        return {"solver": "sde", "steps": 50, "cfg": 1.85, "interval": [0.35, 1.0], "bias_correction": "guidance"}
    return {"solver": "sde", "steps": 50}


def _interference(path: Path | None, info: Any, objective_path: str) -> dict[str, torch.Tensor] | None:
    from .mean_target import mean_target_from_vector

    if path is None:
        return None
    vec = read_torch_file(path)
    if not isinstance(vec, torch.Tensor):
        raise ConvertError(f"--interference {path}: expected a tensor, found a {type(vec).__name__}")
    shape = (info.channels, info.image_size, info.image_size)
    return mean_target_from_vector(vec, info.num_classes, shape, objective_path)


def _vae_record(source: str | None) -> tuple[str | None, str | None]:
    """(source, identity) of ``--vae``: the VAE is loaded once to hash its weights (AutoencoderError if not a VAE)."""
    if source is None:
        return None, None
    from deltafm.vae import load_autoencoder

    ae = load_autoencoder(source)
    return ae.source, ae.identity


def convert_checkpoint(args: argparse.Namespace) -> Path:
    """Read, map, check (the weights load strictly into the built model) and write; returns the folder."""
    from deltafm.train.builders import DataInfo, build_model_for
    from deltafm.train.checkpoint import save_checkpoint
    from deltafm.train.config import config_from_dict, config_to_dict
    from deltafm.train.state import RunState

    root = args.out / "checkpoints"
    if root.exists() and any(root.iterdir()):
        raise ConvertError(f"{root} is not empty: choose a new --out folder")
    obj = read_torch_file(args.ckpt)
    weights, origin = pick_weights(obj, args.weights)
    conv = convert_state_dict(weights, args.layout)
    a = conv.arch
    if args.image_size is not None and args.image_size != a.image_size:
        raise ConvertError(f"--image-size {args.image_size}: the weights are for {a.image_size}x{a.image_size}")
    ref_args = args_dict(obj)
    name, kw = model_spec(a, args.model, args.num_heads)
    k = _num_classes(conv, args.num_classes)
    lam = _lam(args.layout, ref_args, args.lam)
    step = int(obj.get("steps", 0)) if isinstance(obj, dict) and isinstance(obj.get("steps"), int) else 0
    info = DataInfo("latents", "latents", a.in_channels, a.image_size, k, 0, None, float(args.latent_scale), 0.0,
                    *_vae_record(args.vae))
    mean = _interference(args.interference, info, _path_name(ref_args))
    cfg = config_from_dict(_config(args.layout, name, kw, lam, ref_args, step, mean is not None))
    model = build_model_for(cfg, info, check=False)
    try:
        model.load_state_dict(conv.state_dict, strict=True)
    except RuntimeError as e:
        raise ConvertError(f"the converted weights do not fit {name} {kw}: {e}") from None
    state = RunState(step=step, images_seen=step * cfg.train.batch_size, config=config_to_dict(cfg),
                     data=info.to_dict(), mean_target=mean, lam=lam, reason=f"converted from {args.layout}")
    ema = conv.state_dict if origin in ("ema", "state_dict") else None
    final = save_checkpoint(root, step, conv.state_dict, state.to_checkpoint(), ema)
    _side_files(args, conv, origin, ref_args, name, kw, final)
    return final


def _side_files(args: argparse.Namespace, conv: Converted, origin: str, ref_args: dict[str, Any], name: str,
                kw: dict[str, Any], final: Path) -> None:
    from safetensors.torch import save_file

    if conv.extras:
        save_file({k: v.contiguous() for k, v in conv.extras.items()},
                  str(args.out / "reference_projectors.safetensors"))
    record = dict(source=str(args.ckpt), layout=args.layout, weights=origin, model=name, kwargs=kw,
                  architecture=conv.arch.__dict__, notes=conv.notes, checkpoint=str(final),
                  interference=str(args.interference) if args.interference else None, reference_args=ref_args)
    (args.out / "convert.json").write_text(json.dumps(record, indent=1, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        final = convert_checkpoint(args)
    except CLI_ERRORS as e:
        print(cli_error(e), file=sys.stderr)
        return 2
    print(f"wrote {final} (deltafm sample --ckpt {args.out})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
