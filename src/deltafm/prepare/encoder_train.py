"""``deltafm train-encoder``: a small DINOv2-class encoder trained on class labels, saved as a DINOv2 folder.

REPA needs a frozen encoder of the clean images. Where DINOv2 weights cannot be downloaded, this trains a
transformers ``Dinov2Model`` (:mod:`deltafm.prepare.encoder_config`) on the labelled images of the run's
dataset. Each training image x ∈ [−1, 1] (uint8 p ↦ p / 127.5 − 1) is

1. optionally augmented (both off by default): shifted by (dy, dx) ~ U{−shift, …, shift}² at the
   dataset's resolution (zero padding: black) and mirrored left–right with probability ½ (``flip``);
2. preprocessed by :func:`deltafm.encoders.preprocess`, the very function the encoder applies at use
   time: u = (x + 1)/2, gray → RGB, v_c = (u_c − μ_c)/σ_c, bicubic to S = grid · patch; μ, σ are the
   per-channel mean and (population) standard deviation of the training pixels in [0, 1] (after gray → RGB),
   computed exactly in float64 and saved as ``image_mean`` / ``image_std``;
3. encoded: tokens h = Dinov2Model(v).last_hidden_state = [h_cls, h_1 … h_N], logits
   z = W [h_cls ; (1/N) Σ_n h_n] + b, loss = cross-entropy(z, y) (with ``label_smoothing``).

AdamW (weight decay on matrices only), linear warm-up then cosine decay, gradient clipping. The weights,
the data order and the augmentation come from their own seeded streams (:func:`deltafm.seeding.derive_seed`), so
a run is reproducible bit for bit on the same machine and thread count. The held-out accuracy is measured
without augmentation on the dataset's test split (or a seeded held-out slice of a folder without one).

The result, ``OUT/`` (written in a temporary sibling, then renamed):
``config.json`` + ``model.safetensors`` (``Dinov2Model.save_pretrained``: loads with
:func:`deltafm.encoders.load_encoder`), ``preprocessor_config.json`` (``image_mean``, ``image_std``),
``classifier_head.safetensors`` (the linear head, not part of the encoder) and ``train_encoder.json``
(settings, data, accuracy, duration, identity, versions). No checkpoints: a stopped run starts again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafm.atomic import fsync_dir, fsync_file
from deltafm.encoders import Dinov2Encoder, load_encoder, preprocess
from deltafm.pixels import uint8_to_model
from deltafm.seeding import derive_seed, make_generator

from .encoder_config import EncoderSettings, TrainEncoderError, check_settings, dinov2_config
from .settings_checks import resolve_device
from .splits import train_heldout_splits

__all__ = ["DONE_FILE", "EncoderData", "EncoderResult", "EncoderClassifier", "channel_stats", "load_encoder_data",
           "lr_at", "random_flip", "random_shift", "train_encoder"]

DONE_FILE = "train_encoder.json"
Say = Callable[[str], None]
_EVAL_BATCH = 1000


@dataclass
class EncoderData:
    """Training and held-out images (uint8 (N, C, H, W)) with labels, and the normalisation they define."""

    train: Tensor
    train_labels: Tensor
    heldout: Tensor
    heldout_labels: Tensor
    num_classes: int
    name: str
    heldout_source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def record(self) -> dict[str, Any]:
        return dict(dataset=self.name, native_shape=list(self.train.shape[1:]), num_classes=self.num_classes,
                    train_items=int(self.train.shape[0]), heldout_items=int(self.heldout.shape[0]),
                    heldout_source=self.heldout_source, image_mean=list(self.mean), image_std=list(self.std))


@dataclass
class EncoderResult:
    """The written folder and its record (``train_encoder.json``)."""

    out: Path
    record: dict[str, Any]


def channel_stats(images: Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and population std of uint8 images (N, C, H, W) as pixels in [0, 1], exactly (float64
    sums); a gray channel gives the same value for R, G and B (it is repeated at use time)."""
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = (x.pow(2).mean(dim=(0, 2, 3)) - mean.pow(2)).clamp_min(0).sqrt()
    if mean.numel() == 1:
        mean, std = mean.repeat(3), std.repeat(3)
    if float(std.min()) <= 0:
        raise TrainEncoderError("the training images are constant in a channel (std 0); they cannot be normalised")
    m, s = mean.tolist(), std.tolist()
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


def _load_splits(s: EncoderSettings) -> tuple[Any, Any, str]:
    """(train, held-out) in-memory datasets and where the held-out items came from."""
    key = s.dataset.lower().replace("_", "-")
    if key in ("latents", "webdataset"):
        raise TrainEncoderError(f"dataset {key!r} is not held in memory as labelled images; train the encoder on "
                                "fashion-mnist, mnist, digits or an image folder (--dataset folder --root DIR)")
    opts: dict[str, Any] = dict(image_size=s.image_size, channels=3) if key == "folder" else {}

    def held_count(n: int) -> int:
        if n // 5 < 1:
            raise TrainEncoderError(f"{s.root} has {n} images and no test/ subfolder: too few to hold some out")
        return min(s.heldout, n // 5)

    g = torch.Generator().manual_seed(derive_seed(s.seed, 0, "encoder-heldout"))
    return train_heldout_splits(s.dataset, s.root, opts, s.max_items, s.heldout, g, held_count)


def load_encoder_data(s: EncoderSettings) -> EncoderData:
    """Load and check the labelled images of a run (errors name the option to change)."""
    train, held, source = _load_splits(s)
    if getattr(train, "kind", None) != "images" or not hasattr(train, "images"):
        raise TrainEncoderError(f"dataset {train.name!r} does not hold images in memory")
    if train.num_classes < 2:
        raise TrainEncoderError(f"dataset {train.name!r} has {train.num_classes} class; the encoder is trained on "
                                "class labels and needs at least 2 (an image folder: one subfolder per class)")
    if s.batch_size > len(train):
        raise TrainEncoderError(f"--batch-size {s.batch_size} is larger than the {len(train)} training images")
    mean, std = channel_stats(train.images)
    return EncoderData(train.images, train.labels, held.images, held.labels, int(train.num_classes), train.name,
                       source, mean, std)


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Each image of x (B, C, H, W) translated by its own (dy, dx) ∈ {−shift, …, shift}², drawn from
    ``generator`` (CPU); pixels moved in from outside are −1 (black)."""
    if shift == 0:
        return x
    b, _, h, w = x.shape
    d = torch.randint(0, 2 * shift + 1, (2, b), generator=generator).to(x.device)
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0).permute(0, 2, 3, 1)  # (B, H+2s, W+2s, C)
    rows = d[0][:, None] + torch.arange(h, device=x.device)
    cols = d[1][:, None] + torch.arange(w, device=x.device)
    out = padded[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image of x (B, C, H, W) mirrored left–right with probability ½ (one draw per image from
    ``generator``, CPU)."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def lr_at(step: int, total: int, s: EncoderSettings) -> float:
    """lr·(step + 1)/W for step < W (W = warmup), then lr·½(1 + cos(π (step − W)/(T − W))) down to 0 at T."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(1, total - s.warmup)
    return s.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - s.warmup, span) / span))


class EncoderClassifier(nn.Module):
    """``Dinov2Model`` + Linear on [CLS ; mean of the patch tokens], on preprocessed pixels."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(2 * int(backbone.config.hidden_size), num_classes)

    def forward(self, pixels: Tensor) -> Tensor:
        h = self.backbone(pixel_values=pixels).last_hidden_state
        return self.head(torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=-1))


def _new_model(s: EncoderSettings, num_classes: int, device: torch.device) -> EncoderClassifier:
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError:
        raise TrainEncoderError("train-encoder needs the package transformers: pip install 'deltafm[repa]'") from None
    torch.manual_seed(derive_seed(s.seed, 0, "encoder-init"))
    backbone = Dinov2Model(Dinov2Config(**dinov2_config(s)))
    return EncoderClassifier(backbone, num_classes).to(device)


def _optimizer(model: nn.Module, s: EncoderSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on the weight matrices (and the patch convolution), none on biases, norms,
    LayerScale, CLS / mask token and position embeddings."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        tokens = ("cls_token", "mask_token", "position_embeddings", "register_tokens")
        (decay if p.ndim >= 2 and not any(t in name for t in tokens) else plain).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999))


def _pixels(images_u8: Tensor, data: EncoderData, norm: tuple[Tensor, Tensor], s: EncoderSettings,
            device: torch.device, gen: torch.Generator | None = None) -> Tensor:
    x = uint8_to_model(images_u8.to(device))
    if gen is not None:
        x = random_shift(x, s.shift, gen)
        if s.flip:
            x = random_flip(x, gen)
    return preprocess(x, norm[0], norm[1], (s.image_size, s.image_size))


@torch.no_grad()
def accuracy(model: EncoderClassifier, data: EncoderData, norm: tuple[Tensor, Tensor], s: EncoderSettings,
             device: torch.device) -> float:
    """Fraction of held-out images classified right (eval mode, no augmentation)."""
    model.eval()
    right = 0
    for start in range(0, data.heldout.shape[0], _EVAL_BATCH):
        x = _pixels(data.heldout[start:start + _EVAL_BATCH], data, norm, s, device)
        pred = model(x).argmax(dim=-1).cpu()
        right += int((pred == data.heldout_labels[start:start + _EVAL_BATCH]).sum())
    return right / max(1, int(data.heldout.shape[0]))


def _step(model: EncoderClassifier, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, lr: float,
          s: EncoderSettings, step: int) -> tuple[float, int]:
    """One optimizer step on (x, y); returns the loss and the number of right predictions."""
    for group in opt.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=s.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainEncoderError(f"the loss is {value} at step {step + 1}: the training diverged; lower --lr")
    if s.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    opt.step()
    return value, int((logits.detach().argmax(-1) == y).sum())


def _epochs(model: EncoderClassifier, data: EncoderData, norm: tuple[Tensor, Tensor], s: EncoderSettings,
            device: torch.device, say: Say) -> list[dict[str, Any]]:
    """The training passes; one log record per epoch (mean loss, training accuracy on the augmented batches
    as they were trained, held-out accuracy after the epoch, seconds of training)."""
    from tqdm.auto import tqdm

    from deltafm.data.sampler import EpochBatchSampler

    sampler = EpochBatchSampler(int(data.train.shape[0]), s.batch_size, derive_seed(s.seed, 0, "encoder-data"))
    per_epoch = sampler.batches_per_epoch
    total = per_epoch * s.epochs
    gen = make_generator(s.seed, 0, "encoder-augment")
    opt = _optimizer(model, s)
    bar = tqdm(total=total, unit="step", desc="encoder", dynamic_ncols=True, disable=not s.progress, file=sys.stderr)
    aug = [f"shifts up to {s.shift} px"] * bool(s.shift) + ["mirrored"] * s.flip
    aug_text = f" ({', '.join(aug)})" if aug else ""
    history: list[dict[str, Any]] = []
    it, step, held = iter(sampler), 0, None
    try:
        for epoch in range(s.epochs):
            model.train()
            loss_sum, right, seen, start = 0.0, 0, 0, time.perf_counter()
            for _ in range(per_epoch):
                idx = next(it)
                x = _pixels(data.train[idx], data, norm, s, device, gen)
                value, ok = _step(model, opt, x, data.train_labels[idx].to(device), lr_at(step, total, s), s, step)
                step, loss_sum, right, seen = step + 1, loss_sum + value * len(idx), right + ok, seen + len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", acc=f"{right / seen:.3f}",
                                held=f"{held:.4f}" if held is not None else "-", refresh=False)
            seconds = time.perf_counter() - start
            held = accuracy(model, data, norm, s, device)
            history.append(dict(epoch=epoch + 1, step=step, loss=loss_sum / seen, train_accuracy=right / seen,
                                heldout_accuracy=held, seconds=seconds))
            say(f"epoch {epoch + 1}/{s.epochs}: loss {loss_sum / seen:.4f}, training accuracy {right / seen:.4f}"
                f"{aug_text}, held-out accuracy {held:.4f}, {seconds:.0f} s")
    finally:
        bar.close()
    return history


def _say_default(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def check_out(out: Path, overwrite: bool) -> None:
    """``out`` must be a folder that is missing or empty (or ``overwrite``), never a file."""
    if out.exists() and not out.is_dir():
        raise TrainEncoderError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TrainEncoderError(f"--out {out} is not empty; choose another folder or pass --overwrite to replace it")
    for p in out.parents:
        if p.exists() and not p.is_dir():
            raise TrainEncoderError(f"--out {out}: its parent {p} is a file, not a folder")


def train_encoder(s: EncoderSettings, out: str | os.PathLike, overwrite: bool = False,
                  say: Say | None = None) -> EncoderResult:
    """Train the encoder of ``s`` and write it to ``out`` (see the module docstring)."""
    say = say or _say_default
    out = Path(out)
    check_settings(s)
    check_out(out, overwrite)
    began = time.perf_counter()
    device = resolve_device(s.device, TrainEncoderError)
    data = load_encoder_data(s)
    model = _new_model(s, data.num_classes, device)
    norm = (torch.tensor(data.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(data.std, dtype=torch.float32, device=device).view(1, 3, 1, 1))
    say(f"training a Dinov2Model ({sum(p.numel() for p in model.backbone.parameters()):,} parameters, "
        f"{s.grid}x{s.grid} tokens of {s.patch_size} px) on {data.train.shape[0]} {data.name} images")
    train_start = time.perf_counter()
    history = _epochs(model, data, norm, s, device, say)
    train_seconds = time.perf_counter() - train_start
    acc = history[-1]["heldout_accuracy"]  # the final weights, measured after the last epoch
    enc = Dinov2Encoder(model.backbone.to("cpu"), out.resolve().name, data.mean, data.std)
    record = _record(s, data, enc, acc, history, train_seconds, time.perf_counter() - began)
    _write_folder(out, model, enc, record)
    loaded = load_encoder(out)
    if loaded.identity != enc.identity:  # pragma: no cover - would be a bug in saving or loading
        raise RuntimeError(f"{out} loads with identity {loaded.identity}, trained {enc.identity}")
    say(f"wrote {out} ({enc.identity}): held-out accuracy {acc:.4f} on {data.heldout.shape[0]} images "
        f"({data.heldout_source}), {record['duration_s']:.0f} s")
    return EncoderResult(out, record)


def _record(s: EncoderSettings, data: EncoderData, enc: Dinov2Encoder, acc: float, history: list[dict[str, Any]],
            train_seconds: float, duration: float) -> dict[str, Any]:
    import transformers

    return {
        "format": "deltafm.train-encoder", "version": 1, "class": "Dinov2Model", "identity": enc.identity,
        "name": enc.name, "embed_dim": enc.embed_dim, "patch_size": enc.patch_size, "grid": [s.grid, s.grid],
        "image_size": s.image_size, "image_mean": list(enc.image_mean), "image_std": list(enc.image_std),
        "parameters": sum(p.numel() for p in enc.model.parameters()),
        "data": data.record(),
        "metrics": {"heldout_accuracy": acc, "heldout_items": int(data.heldout.shape[0]),
                    "heldout_source": data.heldout_source},
        "history": history, "train": {"epochs": s.epochs, "steps": history[-1]["step"] if history else 0,
                                      "seconds": train_seconds},
        "augmentation": {"shift_px": s.shift, "flip": s.flip},
        "duration_s": duration, "seed": s.seed, "settings": s.to_dict(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "note": "REPA target encoder; not the network that computes the evaluation metrics (docs/ENCODERS.md)",
    }


def _write_folder(out: Path, model: EncoderClassifier, enc: Dinov2Encoder, record: dict[str, Any]) -> None:
    """Everything into a temporary sibling (files fsync'ed), then renamed to ``out`` (an older ``out`` is
    renamed away first, then deleted): a crash leaves the old folder, the new one, or a ``.tmp-`` folder."""
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{os.getpid()}-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        enc.model.save_pretrained(str(tmp))
        (tmp / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": list(enc.image_mean), "image_std": list(enc.image_std)}, indent=1) + "\n")
        head = {k: v.detach().to("cpu").contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / "classifier_head.safetensors"), metadata={"input": "[cls ; mean(patches)]"})
        (tmp / DONE_FILE).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
        for p in tmp.iterdir():
            fsync_file(p)
        fsync_dir(tmp)
        if out.exists():
            gone = out.parent / f".del-{os.getpid()}-{out.name}"
            os.replace(out, gone)
            shutil.rmtree(gone, ignore_errors=True)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar:
            hf_logging.enable_progress_bar()
