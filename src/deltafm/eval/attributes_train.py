"""Training and held-out evaluation of the attribute reader (:mod:`deltafm.eval.attributes`).

Data: ``recipe.scenes`` scenes of the ``all`` split (every (shape, colour) pair, the held-out ones too: the
reader is a measuring instrument and must read the compositions a generator is tested on) under
``recipe.seed``, generated once with exact ground truth. Held-out evaluation uses other scenes: seed
:data:`EVAL_SEED` (training refuses it), ``all`` split, and the ``heldout`` split (every scene holds a held-out
pair).

Loss per batch of N images on the G × G grid (targets of :func:`~deltafm.eval.attributes.scene_targets`,
P = the cells holding a centre)::

    L = (1/N) Σ_cells BCE(objectness) + CE_P(shape) + CE_P(colour) + CE_P(size) + mean_P |Δcentre| / 1 px

(CE_P: cross-entropy averaged over P; Δcentre: the centre error in pixels, both axes). AdamW (lr 3e-3,
weight decay 1e-4), batch 128, 2% linear warm-up then cosine decay to 0. Augmentation, so that the reader
tolerates the softness and grain of generated images: with probability ``blur`` an image is filtered with the
3 × 3 binomial kernel [1, 2, 1]ᵀ[1, 2, 1] / 16 (edges replicated), then Gaussian pixel noise of standard
deviation σ ~ U(0, ``noise``) per image is added in model space ([−1, 1]) and the result clipped to
[−1, 1]. One seed drives initialisation, order and augmentation; deterministic on one thread.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deltafm.data.shapes import ShapeScenes, ShapesConfig, generate_shapes
from deltafm.eval.attributes import AttributeReader, ReaderConfig, scene_targets
from deltafm.eval.attributes_score import compare_scenes, parse_captions, score_scenes
from deltafm.eval.metrics import EvalInputError
from deltafm.pixels import uint8_to_model

__all__ = ["EVAL_SEED", "ReaderRecipe", "augment", "evaluate_reader", "reader_loss", "train_reader"]

#: seed of the held-out evaluation scenes (never trained on)
EVAL_SEED = 1_000_003


@dataclass
class ReaderRecipe:
    """Hyper-parameters of :func:`train_reader` (stored with the weights)."""

    scenes: int = 50_000
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.02
    noise: float = 0.1
    blur: float = 0.3
    seed: int = 0
    widths: tuple[int, int, int] = (32, 48, 64)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.scenes < self.batch_size or self.epochs < 1 or self.batch_size < 1:
            raise EvalInputError(f"need epochs >= 1 and scenes >= batch_size >= 1, got scenes {self.scenes}, "
                                 f"epochs {self.epochs}, batch_size {self.batch_size}")
        if self.seed == EVAL_SEED or self.seed < 0:
            raise EvalInputError(f"seed must be >= 0 and not {EVAL_SEED} (the evaluation scenes' seed)")
        if not self.noise >= 0 or not self.lr > 0 or not 0 <= self.blur <= 1:
            raise EvalInputError(f"need noise >= 0, lr > 0 and blur in [0, 1], got {self.noise}, {self.lr}, "
                                 f"{self.blur}")


def reader_loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor], stride: int) -> tuple[torch.Tensor,
                                                                                                 dict[str, float]]:
    """The loss of the module docstring and its parts (floats, for the progress bar)."""
    n = target["object"].shape[0]
    obj = F.binary_cross_entropy_with_logits(out["object"], target["object"], reduction="sum") / n
    pos = target["object"] > 0
    parts = {"object": obj}
    for f in ("shape", "colour", "size"):
        logits = out[f].permute(0, 2, 3, 1)[pos]
        parts[f] = F.cross_entropy(logits, target[f][pos]) if len(logits) else obj * 0
    off = (out["offset"] - target["offset"]).permute(0, 2, 3, 1)[pos]
    parts["centre"] = off.abs().mean() * stride if len(off) else obj * 0
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def augment(x: torch.Tensor, recipe: ReaderRecipe, gen: torch.Generator) -> torch.Tensor:
    """Blur (probability ``recipe.blur``) then noise of σ ~ U(0, ``recipe.noise``), clipped (module docstring)."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None] / 16).expand(x.shape[1], 1, 3, 3).contiguous()
    soft = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])
    pick = torch.rand(len(x), 1, 1, 1, generator=gen) < recipe.blur
    x = torch.where(pick, soft, x)
    sigma = torch.rand(len(x), 1, 1, 1, generator=gen) * recipe.noise
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def _fit(reader: AttributeReader, data: ShapeScenes, recipe: ReaderRecipe, progress: bool) -> float:
    """Optimise ``reader`` on ``data`` (module docstring); returns the final running loss."""
    r, cfg = recipe, reader.config
    gen = torch.Generator().manual_seed(r.seed)
    images = torch.from_numpy(data.images)
    targets = scene_targets(data.scenes, cfg)
    opt = torch.optim.AdamW(reader.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    per_epoch = len(images) // r.batch_size
    total = r.epochs * per_epoch
    warmup = max(1, int(r.warmup_frac * total))
    reader.train()
    step, run = 0, None
    bar = tqdm(total=total, desc="attribute reader", disable=not progress)
    for epoch in range(r.epochs):
        order = torch.randperm(len(images), generator=gen)
        for b in range(per_epoch):
            idx = order[b * r.batch_size:(b + 1) * r.batch_size]
            x = augment(uint8_to_model(images[idx]), r, gen)
            for group in opt.param_groups:
                group["lr"] = r.lr * _lr_factor(step, total, warmup)
            loss, parts = reader_loss(reader.heads(x), {k: v[idx] for k, v in targets.items()}, cfg.stride)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            run = float(loss.detach()) if run is None else 0.98 * run + 0.02 * float(loss.detach())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{run:.3f}", centre_px=f"{parts['centre']:.2f}")
    bar.close()
    return float(run)


def train_reader(recipe: ReaderRecipe | None = None, config: ShapesConfig | None = None, progress: bool = True,
                 evaluate: int = 2000) -> AttributeReader:
    """Train a reader (module docstring) for the scenes of ``config`` (default 32 × 32); with ``evaluate`` > 0,
    measure it on that many held-out scenes of each evaluation set (:func:`evaluate_reader`) into
    ``reader.meta["heldout"]``. Deterministic given ``recipe.seed`` on one thread; global RNG state restored."""
    recipe = recipe or ReaderRecipe()
    config = config or ShapesConfig()
    t0 = time.perf_counter()
    data = generate_shapes(recipe.scenes, seed=recipe.seed, split="all", config=config)
    gen_seconds = time.perf_counter() - t0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        reader = AttributeReader(ReaderConfig.from_shapes(config, recipe.widths))
        t0 = time.perf_counter()
        final_loss = _fit(reader, data, recipe, progress)
        train_seconds = time.perf_counter() - t0
    reader.eval()
    reader.meta.update({
        "recipe": asdict(recipe), "shapes_config": _config_dict(config), "train_seconds": round(train_seconds, 1),
        "generate_seconds": round(gen_seconds, 1), "final_loss": round(final_loss, 5),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in reader.parameters()),
    })
    if evaluate:
        reader.meta["heldout"] = evaluate_reader(reader, evaluate, config)
    return reader


def _config_dict(config: ShapesConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def evaluate_reader(reader: AttributeReader, n: int = 2000, config: ShapesConfig | None = None,
                    seed: int = EVAL_SEED) -> dict[str, dict[str, Any]]:
    """The reader on ``n`` scenes of the ``all`` and of the ``heldout`` split under ``seed``: per-object
    accuracies, count and exact-scene accuracy (:func:`~deltafm.eval.attributes_score.compare_scenes`) and the
    scores of the real images against their own captions (``caption_agreement`` = their prompt accuracy,
    ``caption_per_attribute``)."""
    config = config or ShapesConfig(canvas=reader.config.canvas)
    reader.config.check_shapes(config)
    out = {}
    for split in ("all", "heldout"):
        data = generate_shapes(n, seed=seed, split=split, config=config)
        read = reader.read(data.images)
        acc: dict[str, Any] = compare_scenes(read, data.scenes, (config.size_px[0] + config.gap_px) / 2)
        prompts = score_scenes(read, parse_captions(data.captions, config))
        acc["caption_agreement"] = prompts["prompt_accuracy"]
        acc["caption_per_attribute"] = prompts["per_attribute"]
        out[split] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in acc.items()}
        out[split]["scenes"], out[split]["seed"] = n, seed
    return out
