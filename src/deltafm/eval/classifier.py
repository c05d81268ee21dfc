"""A small CNN classifier that serves as the feature network for FD, IS and class accuracy.

No Inception weights can be downloaded here, so the project trains its own network on the
**training split** of the dataset (never the test split it is evaluated on) and uses

* its penultimate layer (global average pool of the last conv stage, like Inception's pool3) as the
  feature space for the Fréchet distance and precision/recall, and
* its logits for the Inception Score and the class accuracy of generated samples.

Architecture (inputs (N, C, H, W) in [−1, 1], any H, W ≥ 4; 28x28 and 8x8 are the tested sizes)::

    conv3x3(C→w₀) ─ maxpool2 ─ [conv3x3(w₀→w₁), conv3x3(w₁→w₁)] ─ maxpool2
                  ─ [conv3x3(w₁→w₂), conv3x3(w₂→w₂)] ─ global avg pool  → features (w₂ = 128)
                  ─ dropout ─ linear(w₂→K)                              → logits

each conv followed by BatchNorm and ReLU; widths (32, 64, 128), 0.28 M parameters.

Training recipe (:func:`train_classifier`): AdamW (lr 2e-3, weight decay 0.05, betas (0.9, 0.999)),
batch 128, linear warm-up over the first 2% of steps then cosine decay to 0, cross-entropy without
label smoothing (keeps the probabilities usable for IS), augmentation: random translation by up to
±2 pixels (padding with the background value −1) and, for datasets where it is label-preserving
(Fashion-MNIST; not digits), random horizontal flips. Data order, augmentation and initialisation
follow one seed. See docs/EVAL.md for the measured test accuracy and time.

Storage (:func:`save_classifier`, :func:`load_classifier`): weights in safetensors with a JSON
metadata entry (architecture, recipe, dataset, test accuracy, training time) in the header, and a
``<file>.sha256`` sidecar in ``sha256sum`` format holding the content hash of the weights file. Loading
verifies the hash and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from deltafm.eval.metrics import EvalInputError
from deltafm.pixels import uint8_to_model

__all__ = [
    "Classifier",
    "ClassifierConfig",
    "TrainRecipe",
    "evaluate_accuracy",
    "file_sha256",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

FORMAT = "deltafm-classifier-v1"

#: Datasets whose labels survive a horizontal flip (used to pick the default augmentation).
FLIP_SAFE = ("fashion-mnist",)


@dataclass
class ClassifierConfig:
    """Architecture of :class:`Classifier`."""

    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, int, int] = (32, 64, 128)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)  # JSON round trips give lists
        if len(self.widths) != 3:
            raise ValueError(f"widths must have 3 entries, got {self.widths}")


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Classifier(nn.Module):
    """Small CNN: ``features(x)`` (N, widths[-1]) and ``logits(x)`` (N, num_classes); x in [−1, 1]."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        w0, w1, w2 = self.config.widths
        self.trunk = nn.Sequential(
            *_conv_bn_relu(self.config.in_channels, w0),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w0, w1),
            *_conv_bn_relu(w1, w1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w1, w2),
            *_conv_bn_relu(w2, w2),
        )
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(w2, self.config.num_classes)
        #: "classifier:<sha256 of the weights file>" once saved or loaded; used in reference stats.
        self.extractor_id = "classifier:unsaved"
        #: Metadata stored with the weights (recipe, dataset, test accuracy, ...).
        self.meta: dict[str, Any] = {}

    @property
    def feature_dim(self) -> int:
        return self.config.widths[-1]

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise EvalInputError(
                f"the classifier takes {self.config.in_channels}-channel images: expected "
                f"(N, {self.config.in_channels}, H, W) images in [-1, 1], got {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < 4:
            raise EvalInputError(f"images must be at least 4x4 (two 2x poolings), got {tuple(x.shape[-2:])}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: global average pool of the last conv stage, (N, widths[-1])."""
        self._check(x)
        return self.trunk(x).mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.dropout(self.features(x)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one forward pass."""
        f = self.features(x)
        return f, self.head(self.dropout(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainRecipe:
    """Hyper-parameters of :func:`train_classifier` (stored with the weights)."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.02
    max_shift: int = 2
    hflip: bool = True
    seed: int = 0
    widths: tuple[int, int, int] = (32, 64, 128)
    dropout: float = 0.1


def _as_uint8_nchw(images: Any) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.dtype != torch.uint8:
        raise EvalInputError(f"the classifier trains on uint8 images: expected uint8 (N, H, W) or (N, C, H, W), "
                             f"got {x.dtype} {tuple(x.shape)}")
    return x


def _augment(x: torch.Tensor, max_shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ±max_shift pixels (background −1 enters) and optional h-flip.

    Implemented as pad-with-(−1) then a per-sample random crop back to (H, W).
    """
    n, _, h, w = x.shape
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_shift > 0:
        s = max_shift
        padded = F.pad(x, (s, s, s, s), value=-1.0)
        dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (n, 1, h, 1)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (n, 1, 1, w)
        batch = torch.arange(n)[:, None, None, None]
        chan = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    return x


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_accuracy(model: Classifier, images: Any, labels: Any, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on uint8 images (N, [C,] H, W) with integer labels."""
    x = _as_uint8_nchw(images)
    y = torch.as_tensor(labels).long()
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        xb = uint8_to_model(x[start : start + batch_size])
        correct += int((model(xb).argmax(1) == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)


def _fit(model: Classifier, images: torch.Tensor, labels: torch.Tensor, recipe: TrainRecipe,
         gen: torch.Generator, desc: str, progress: bool) -> None:
    """The optimisation of :func:`train_classifier`: ``recipe.epochs`` passes in ``gen``'s order, full
    batches only, AdamW with warm-up and cosine decay, augmented batches."""
    r = recipe
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    steps_per_epoch = len(images) // r.batch_size  # drop the last partial batch
    total = r.epochs * steps_per_epoch
    warmup = max(1, int(r.warmup_frac * total))
    model.train()
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress)
    for epoch in range(r.epochs):
        order = torch.randperm(len(images), generator=gen)
        run_loss = run_acc = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * r.batch_size : (b + 1) * r.batch_size]
            x = _augment(uint8_to_model(images[idx]), r.max_shift, r.hflip, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            for group in opt.param_groups:
                group["lr"] = r.lr * _lr_factor(step, total, warmup)
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            run_loss = 0.98 * run_loss + 0.02 * float(loss.detach()) if step > 1 else float(loss.detach())
            acc = float((out.argmax(1) == y).float().mean())
            run_acc = 0.98 * run_acc + 0.02 * acc if step > 1 else acc
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{run_loss:.3f}", acc=f"{run_acc:.3f}")
    bar.close()


def train_classifier(
    dataset_train: Any,
    epochs: int = 15,
    seed: int = 0,
    dataset_test: Any | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    hflip: bool | None = None,
    max_shift: int = 2,
    widths: tuple[int, int, int] = (32, 64, 128),
    dropout: float = 0.1,
    progress: bool = True,
) -> Classifier:
    """Train a :class:`Classifier` on a labelled training split with the recipe in the module docstring.

    Args:
        dataset_train: object with ``.images`` uint8 (N, H, W) or (N, C, H, W), ``.labels`` (N,) and
            optionally ``.num_classes`` and ``.name``.
        epochs: passes over the training split.
        seed: seeds initialisation, data order, dropout and augmentation (global RNG state is restored).
        dataset_test: if given, the accuracy on it is measured once after training (never used for
            training or model selection) and stored in ``model.meta["test_accuracy"]``.
        hflip: random horizontal flips; default True only for datasets in ``FLIP_SAFE``.
        progress: show a tqdm bar.

    Returns:
        The trained model in eval mode, with ``model.meta`` holding the recipe, dataset name,
        training time and accuracies.
    """
    images = _as_uint8_nchw(dataset_train.images)
    labels = torch.as_tensor(dataset_train.labels).long()
    name = str(getattr(dataset_train, "name", "unknown"))
    num_classes = int(getattr(dataset_train, "num_classes", int(labels.max()) + 1))
    if hflip is None:
        hflip = name in FLIP_SAFE
    recipe = TrainRecipe(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, max_shift=max_shift,
        hflip=hflip, seed=seed, widths=widths, dropout=dropout,
    )
    config = ClassifierConfig(images.shape[1], num_classes, widths, dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(config)
        model = model.to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        _fit(model, images, labels, recipe, torch.Generator().manual_seed(seed), f"classifier[{name}]", progress)
        train_seconds = time.perf_counter() - t0
    model = model.to(memory_format=torch.contiguous_format).eval()
    model.meta = {
        "format": FORMAT,
        "dataset": name,
        "image_shape": list(images.shape[1:]),
        "recipe": asdict(recipe),
        "train_seconds": round(train_seconds, 1),
        "train_images": len(images),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if dataset_test is not None:
        model.meta["test_accuracy"] = evaluate_accuracy(model, dataset_test.images, dataset_test.labels)
        model.meta["test_images"] = len(dataset_test.labels)
    return model


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_sha256_sidecar(path: Path) -> str:
    """Write ``path.sha256`` (``<hex>  <name>``) beside a weights file; return the hex sha256."""
    digest = file_sha256(path)
    _sidecar(path).write_text(f"{digest}  {path.name}\n")
    return digest


def verified_sha256(path: Path, sha256: str | None = None, verify: bool = True) -> str:
    """The hex sha256 of ``path``; with ``verify`` it must equal ``sha256`` or, when None, the one in
    ``path.sha256`` (FileNotFoundError when there is no sidecar, :class:`EvalInputError` on a mismatch)."""
    digest = file_sha256(path)
    if verify:
        if sha256 is None:
            side = _sidecar(path)
            if not side.is_file():
                raise FileNotFoundError(
                    f"no hash sidecar {side} for {path}; pass sha256=... or verify=False to skip the check"
                )
            sha256 = (side.read_text().split() or [""])[0]
        if digest != sha256.lower():
            raise EvalInputError(f"sha256 mismatch for {path}: file has {digest}, expected {sha256}")
    return digest


def save_classifier(model: Classifier, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> str:
    """Write ``path`` (safetensors) and ``path.sha256``; return the hex sha256 of the weights file.

    The header metadata entry ``"deltafm"`` holds JSON with ``config`` (architecture) and ``model.meta``
    updated by ``meta``. Sets ``model.extractor_id = "classifier:<sha256>"``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full_meta = {**model.meta, **(meta or {}), "format": FORMAT, "config": asdict(model.config)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"deltafm": json.dumps(full_meta, sort_keys=True)})
    digest = write_sha256_sidecar(path)
    model.meta = full_meta
    model.extractor_id = f"classifier:{digest}"
    return digest


def load_classifier(
    path: str | os.PathLike, sha256: str | None = None, verify: bool = True
) -> Classifier:
    """Load a classifier saved by :func:`save_classifier`, after checking its content hash.

    Args:
        path: the .safetensors file.
        sha256: expected hex digest; default: read from ``path.sha256``.
        verify: refuse to load without a matching hash (set False only for files you made yourself).

    Raises:
        FileNotFoundError: no weights file, or no sidecar and no ``sha256`` while ``verify``.
        EvalInputError (a ValueError): not a safetensors file (pickles are never read), not a deltafm
            classifier file, hash mismatch (file changed or corrupted), or damaged contents.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")
    what = "classifier weights are a .safetensors file written by `deltafm eval train-classifier`"
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except SafetensorError as err:
        raise EvalInputError(f"{path} is not a safetensors file ({err}); {what} (never unpickled)") from None
    if "deltafm" not in header:
        raise EvalInputError(f"{path} has no 'deltafm' metadata; not a deltafm classifier file ({what})")
    digest = verified_sha256(path, sha256, verify)
    try:
        meta = json.loads(header["deltafm"])
        if meta.get("format") != FORMAT:
            raise EvalInputError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT!r})")
        model = Classifier(ClassifierConfig(**meta["config"]))
        model.load_state_dict(load_file(str(path)), strict=True)
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError, RuntimeError,
            SafetensorError) as err:
        if isinstance(err, EvalInputError):
            raise
        raise EvalInputError(f"{path}: damaged classifier file ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200] if str(err) else ''}); {what}") from None
    model.meta = meta
    model.extractor_id = f"classifier:{digest}"
    return model.eval()
