"""The attribute reader: a small CNN that reads a coloured-shapes image back into a :class:`~deltafm.data.shapes.Scene`
(which objects, their shape, colour, size, box and 3 × 3 cell), for GenEval-like scoring of generated images
against their prompts (:mod:`deltafm.eval.attributes_score`) and as a feature network for FD.

Design: a centre grid. The trunk downsamples the canvas by a stride s = 2^k, k = ⌊log₂(canvas / 8)⌋ (s = 4 at
32 × 32 and 48 × 48, 8 at 64 × 64), to a G × G grid, G = canvas / s (8 at 32). Every grid cell predicts

* objectness: whether an object's centre (its box midpoint) lies in the cell;
* the shape, colour and size of that object (softmax over the vocabularies);
* the centre's offset inside the cell, (c − s·g) / s ∈ [0, 1) per axis (sigmoid).

Two centres never share a grid cell: boxes of the generator are apart by ``gap_px`` along x or y, so two
centres differ by at least size_px[0] + gap_px (10 px at 32) along one axis, more than s (checked in
:class:`ReaderConfig`). The 3 × 3 position cells are far coarser (two small objects can share one: 56 of 26 585
object pairs of 20 000 scenes did), which is why the reader does not predict them directly. An object's extent
is fixed by its size (e = size_px[size]), so centre and size give the box exactly: x0 = round(cx − e/2),
clamped to the canvas, and the cell is that of the box midpoint (:func:`~deltafm.data.shapes_config.cell_of`),
as the generator defines it. Relations (box before box along an axis) are then read from the boxes.

Decoding (:meth:`AttributeReader.read`): the cells with objectness probability > ``threshold`` (0.5), most
confident first; a detection whose centre is within (size_px[0] + gap_px) / 2 (Chebyshev) of a kept one is a
duplicate from a neighbouring grid cell and dropped (real centres are at least twice that apart).

Architecture (inputs (N, 3, canvas, canvas) in [−1, 1]; widths (w₀, w₁, w₂), default (32, 48, 64))::

    conv3x3(3→w₀) ─ k × [conv3x3 stride 2 (→w₁, the last →w₂), conv3x3] ─ 2 × conv3x3(w₂→w₂)  = trunk (N, w₂, G, G)
    features = [mean over the grid, max over the grid] of the trunk   (N, 2·w₂), the FD embedding
    heads    = conv1x1(w₂→w₂) ─ ReLU ─ conv1x1(w₂ → 1 + S + C + 2 + 2)

each conv3x3 with BatchNorm and ReLU; 179 697 parameters (a 0.73 MB safetensors file) at the defaults.

Storage (:func:`save_reader`, :func:`load_reader`): safetensors with a JSON header entry (format, config with the
vocabularies and geometry, recipe, held-out accuracies) and a ``<file>.sha256`` sidecar, as
:mod:`deltafm.eval.classifier`; loading checks the hash and never unpickles.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from deltafm.data.shapes import COLOURS, SHAPES, SIZES, Scene, ShapeObject, ShapesConfig
from deltafm.data.shapes_config import cell_of
from deltafm.eval.classifier import verified_sha256, write_sha256_sidecar
from deltafm.eval.metrics import EvalInputError
from deltafm.pixels import images_to_model

__all__ = ["FORMAT", "AttributeReader", "ReaderConfig", "load_reader", "save_reader", "scene_targets"]

FORMAT = "deltafm-attribute-reader-v1"


@dataclass
class ReaderConfig:
    """Architecture and the shapes geometry a reader is trained for (module docstring). ``from_shapes`` builds it
    from a :class:`ShapesConfig`; ``check_shapes`` refuses a config the reader cannot read."""

    canvas: int = 32
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    size_px: tuple[int, int] = (8, 13)
    gap_px: int = 2
    widths: tuple[int, int, int] = (32, 48, 64)
    stride: int = field(init=False)
    grid: int = field(init=False)

    def __post_init__(self) -> None:
        self.shapes, self.colours = tuple(self.shapes), tuple(self.colours)  # JSON gives lists
        self.size_px, self.widths = tuple(int(v) for v in self.size_px), tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise EvalInputError(f"reader widths must be 3 positive integers, got {self.widths}")
        if int(self.canvas) != self.canvas or self.canvas < 16:
            raise EvalInputError(f"reader canvas must be an integer >= 16, got {self.canvas}")
        self.stride = 2 ** int(math.floor(math.log2(self.canvas / 8)))
        self.grid = self.canvas // self.stride
        if self.canvas % self.stride:
            raise EvalInputError(f"reader canvas {self.canvas} is not a multiple of its stride {self.stride}")
        if self.stride > self.size_px[0] + self.gap_px:
            raise EvalInputError(f"grid cells of {self.stride} px could hold two object centres (they are "
                                 f"{self.size_px[0] + self.gap_px} px apart); larger objects or gap needed")

    @classmethod
    def from_shapes(cls, config: ShapesConfig, widths: tuple[int, int, int] = (32, 48, 64)) -> ReaderConfig:
        return cls(config.canvas, config.shapes, config.colours, config.size_px, config.gap_px, widths)

    def check_shapes(self, config: ShapesConfig) -> None:
        """Raise :class:`EvalInputError` unless ``config`` has this reader's canvas, vocabularies and sizes."""
        diffs = [f"{name} {mine} (reader) vs {theirs} (data)" for name, mine, theirs in (
            ("canvas", self.canvas, config.canvas), ("shapes", self.shapes, config.shapes),
            ("colours", self.colours, config.colours), ("size_px", self.size_px, config.size_px))
            if tuple(np.atleast_1d(mine)) != tuple(np.atleast_1d(theirs))]
        if diffs:
            raise EvalInputError("the attribute reader was trained for other scenes: " + "; ".join(diffs)
                                 + "; train a reader for these settings")

    @property
    def head_channels(self) -> tuple[int, int, int, int, int]:
        """(objectness, shape, colour, size, offset) channel counts of the head output."""
        return 1, len(self.shapes), len(self.colours), len(SIZES), 2


def _conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class AttributeReader(nn.Module):
    """The reader network (module docstring): ``heads(x)`` per grid cell, ``features(x)`` (N, 2·w₂) for FD,
    ``logits(x)`` None (the feature-extractor protocol), ``read(images)`` scenes."""

    def __init__(self, config: ReaderConfig | None = None) -> None:
        super().__init__()
        self.config = config or ReaderConfig()
        w0, w1, w2 = self.config.widths
        stages = int(math.log2(self.config.stride))
        layers, c = _conv(3, w0), w0
        for k in range(stages):
            out = w2 if k == stages - 1 else w1
            layers += _conv(c, out, stride=2) + _conv(out, out)
            c = out
        layers += _conv(w2, w2) + _conv(w2, w2)
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(w2, w2, 1), nn.ReLU(), nn.Conv2d(w2, sum(self.config.head_channels), 1))
        with torch.no_grad():  # objectness starts at the prior of ~2 centres in G² cells (not at 1/2)
            self.head[-1].bias[0] = math.log(2 / (self.config.grid ** 2 - 2))
        #: "attributes:<sha256 of the weights file>" once saved or loaded
        self.extractor_id = "attributes:unsaved"
        #: metadata stored with the weights (recipe, held-out accuracies, image_shape, ...)
        self.meta: dict[str, Any] = {"image_shape": [3, self.config.canvas, self.config.canvas]}

    @property
    def feature_dim(self) -> int:
        return 2 * self.config.widths[-1]

    def _check(self, x: torch.Tensor) -> None:
        c = self.config.canvas
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, c, c):
            raise EvalInputError(f"the attribute reader takes (N, 3, {c}, {c}) images (its canvas), got "
                                 f"{tuple(x.shape)}")

    def heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-grid-cell outputs: ``object`` logits (N, G, G), ``shape``, ``colour``, ``size`` logits (N, K, G, G),
        ``offset`` (N, 2, G, G) in [0, 1] (x, y)."""
        self._check(x)
        parts = torch.split(self.head(self.trunk(x)), self.config.head_channels, dim=1)
        return {"object": parts[0][:, 0], "shape": parts[1], "colour": parts[2], "size": parts[3],
                "offset": torch.sigmoid(parts[4])}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: mean and max of the trunk over the grid, (N, 2·w₂)."""
        self._check(x)
        t = self.trunk(x)
        return torch.cat([t.mean(dim=(2, 3)), t.amax(dim=(2, 3))], dim=1)

    def logits(self, x: torch.Tensor) -> None:
        """No class logits (the reader has per-cell heads); present for the feature-extractor protocol."""
        return None

    @torch.no_grad()
    def read(self, images: np.ndarray | torch.Tensor, threshold: float = 0.5, batch_size: int = 256,
             top1: bool = False) -> list[Scene]:
        """The scenes of uint8 images (N, 3, canvas, canvas) (module docstring). ``top1``: exactly the most
        confident object per image, whatever its probability (single-object images)."""
        if len(images) == 0:
            return []
        was_training = self.training
        self.eval()
        scenes: list[Scene] = []
        try:
            for start in range(0, len(images), batch_size):
                x = images_to_model(images[start:start + batch_size])
                scenes += decode(self.heads(x), self.config, threshold, top1)
        finally:
            self.train(was_training)
        return scenes


def decode(out: dict[str, torch.Tensor], config: ReaderConfig, threshold: float = 0.5,
           top1: bool = False) -> list[Scene]:
    """Scenes from head outputs (module docstring: threshold, duplicate suppression, box from centre and size)."""
    prob = torch.sigmoid(out["object"]).flatten(1).numpy()  # (N, G·G)
    labels = {k: out[k].argmax(1).flatten(1).numpy() for k in ("shape", "colour", "size")}
    offset = out["offset"].flatten(2).numpy()  # (N, 2, G·G)
    g, s, c = config.grid, config.stride, config.canvas
    near = (config.size_px[0] + config.gap_px) / 2
    scenes = []
    for n in range(prob.shape[0]):
        order = np.argsort(-prob[n], kind="stable")
        cells = order[:1] if top1 else [i for i in order if prob[n, i] > threshold]
        objects, centres = [], []
        for i in cells:
            cx, cy = (i % g + offset[n, 0, i]) * s, (i // g + offset[n, 1, i]) * s
            if any(max(abs(cx - px), abs(cy - py)) < near for px, py in centres):
                continue
            size = int(labels["size"][n, i])
            e = config.size_px[size]
            x0, y0 = (int(min(max(round(v - e / 2), 0), c - e)) for v in (cx, cy))
            objects.append(ShapeObject(config.shapes[labels["shape"][n, i]], config.colours[labels["colour"][n, i]],
                                       SIZES[size], (x0, y0, x0 + e, y0 + e), cell_of(x0 + e / 2, y0 + e / 2, c)))
            centres.append((cx, cy))
        scenes.append(Scene(tuple(objects)))
    return scenes


def scene_targets(scenes: list[Scene] | tuple[Scene, ...], config: ReaderConfig) -> dict[str, torch.Tensor]:
    """Training targets on the grid: ``object`` float (N, G, G) 0/1; ``shape``, ``colour``, ``size`` int64
    (N, G, G), −1 where no centre lies; ``offset`` float (N, 2, G, G), the centre's position in its cell."""
    n, g, s = len(scenes), config.grid, config.stride
    out = {"object": torch.zeros(n, g, g), "offset": torch.zeros(n, 2, g, g)}
    out.update({k: torch.full((n, g, g), -1, dtype=torch.long) for k in ("shape", "colour", "size")})
    index = {f: {v: i for i, v in enumerate(vocab)} for f, vocab in
             (("shape", config.shapes), ("colour", config.colours), ("size", SIZES))}
    for k, scene in enumerate(scenes):
        for o in scene.objects:
            cx, cy = o.centre
            gx, gy = min(int(cx // s), g - 1), min(int(cy // s), g - 1)
            if out["object"][k, gy, gx]:
                raise EvalInputError(f"scene {k}: two object centres in one grid cell of {s} px; not a scene of "
                                     "the reader's geometry")
            out["object"][k, gy, gx] = 1.0
            try:
                for f in ("shape", "colour", "size"):
                    out[f][k, gy, gx] = index[f][getattr(o, f)]
            except KeyError as err:
                raise EvalInputError(f"scene {k}: {err.args[0]!r} is not in the reader's vocabularies") from None
            out["offset"][k, :, gy, gx] = torch.tensor([cx / s - gx, cy / s - gy])
    return out


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def save_reader(reader: AttributeReader, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> str:
    """Write ``path`` (safetensors, JSON metadata entry ``"deltafm"``: format, config, ``reader.meta`` updated by
    ``meta``) and ``path.sha256``; return the hex sha256 and set ``reader.extractor_id``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise EvalInputError(f"--out {path} is a folder; name the .safetensors file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in asdict(reader.config).items() if k not in ("stride", "grid")}
    full = {**reader.meta, **(meta or {}), "format": FORMAT, "config": cfg}
    state = {k: v.detach().cpu().contiguous() for k, v in reader.state_dict().items()}
    save_file(state, str(path), metadata={"deltafm": json.dumps(full, sort_keys=True)})
    digest = write_sha256_sidecar(path)
    reader.meta, reader.extractor_id = full, f"attributes:{digest}"
    return digest


def load_reader(path: str | os.PathLike, sha256: str | None = None, verify: bool = True,
                shapes: ShapesConfig | None = None) -> AttributeReader:
    """Load a reader written by :func:`save_reader` after checking its sha256 (``sha256`` or the sidecar).

    ``shapes``: refuse a reader trained for another canvas, vocabularies or sizes than this config's.

    Raises:
        FileNotFoundError: no weights file, or (with ``verify``) no sidecar and no ``sha256``.
        EvalInputError: not a safetensors file (never unpickled), not an attribute reader, hash mismatch,
            damaged contents, or a reader for other scenes than ``shapes``.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute reader weights not found: {path}")
    what = "a reader is a .safetensors file written by `attributes train` (deltafm.eval.attributes_cli)"
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except SafetensorError as err:
        raise EvalInputError(f"{path} is not a safetensors file ({err}); {what}") from None
    digest = verified_sha256(path, sha256, verify)
    try:
        meta = json.loads(header["deltafm"])
        if meta.get("format") != FORMAT:
            raise EvalInputError(f"{path}: format {meta.get('format')!r} is not an attribute reader ({FORMAT!r})")
        reader = AttributeReader(ReaderConfig(**meta["config"]))
        reader.load_state_dict(load_file(str(path)), strict=True)
    except EvalInputError:
        raise
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError, RuntimeError,
            SafetensorError) as err:
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise EvalInputError(f"{path}: damaged attribute reader file ({type(err).__name__}: {first}); {what}") from None
    if shapes is not None:
        reader.config.check_shapes(shapes)
    reader.meta, reader.extractor_id = meta, f"attributes:{digest}"
    return reader.eval()
