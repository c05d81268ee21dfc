"""Scoring text and multi-condition arms on the shapes sets with the attribute reader (``eval.scorer: attributes``).

**Prompts.** A sampling unit of N samples for prompt split S conditions sample i on item i of S (i < N), as
the training data builder loads it (``data`` section of the base config with ``split: S``): its caption
(text arms; each distinct caption encoded once, on one CPU thread, by the checkpoint's recorded encoder,
as ``deltafm sample`` does) or its conditions, the ones the arm is conditioned on (multi arms; e.g. shape,
colour, cell). ``test`` holds seen (shape, colour) pairs, ``heldout`` only held-out pairs.

**Metrics** of the N uint8 samples, read by the reader (:mod:`deltafm.eval.attributes_score`):

* text arms (:func:`~deltafm.eval.attributes_score.score_prompts`): ``prompt_acc`` (fraction of prompts whose
  every claim holds in the read scene), ``agreement`` (mean fraction of a prompt's claims that hold),
  ``acc.<kind>`` for kind in shape, colour, size, cell, count, relation (claims of that kind that hold; None
  when no prompt makes one);
* multi arms (:func:`~deltafm.eval.attributes_score.score_single_objects`): ``acc.<part>`` (the reader's most
  confident object has the asked value of that part), ``all_acc`` (every conditioned part right),
  ``one_object`` (exactly one object read);
* both: ``fd``, the Fréchet distance in the reader's features
  (:func:`~deltafm.eval.attributes_score.reader_fd`) to the statistics of the split's first
  ``eval.reference_max`` real images (default: all 10,000), cached as
  ``OUT/classifier/ref-attributes-<dataset>-<split>.npz`` and recomputed when the reader, the item count, the
  dataset or the canvas changed.

The model samples on ``--device``; the reader (180k parameters) reads on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deltafm.solvers import nfe_to_steps
from deltafm.study.spec import CompareConfig, CompareError, apply_study_overrides

__all__ = ["AttributeEvaluator", "Prompts", "load_checked_reader"]


@dataclass
class Prompts:
    """What N samples of one split are asked for: ``labels`` (the condition argument of
    :func:`deltafm.generate.generate`), ``captions`` (text) or ``ids`` (multi: part -> value ids (N,)), and a
    title per sample for grids."""

    labels: Any
    titles: list[str]
    captions: list[str] | None = None
    ids: dict[str, np.ndarray] | None = None


class AttributeEvaluator:
    """The attribute reader, the real splits and their reference statistics, and the sampling and scoring of
    one checkpoint's units (the interface of :class:`deltafm.study.evaluator.Evaluator`)."""

    def __init__(self, c: CompareConfig, out: Path, device: str, log: Callable[[str], None]) -> None:
        import torch

        from deltafm.data.shapes import ShapesConfig
        from deltafm.train.config import config_from_dict

        self.c, self.out, self.device, self.log = c, out, device, log
        self.base = config_from_dict(apply_study_overrides(c))
        self.dataset = self.base.data.name
        self.shapes = ShapesConfig(canvas=self.base.data.image_size or 32)
        self.reader = load_checked_reader(c)  # stays on the CPU (it reads CPU arrays)
        self.extractor_id = self.reader.extractor_id
        log(f"attribute reader {c.eval.reader} ({self.extractor_id[:23]}...)")
        self._splits: dict[str, Any] = {}
        self._conditions: dict[str, Any] = {}
        self._prompts: dict[tuple[str, str, int], Prompts] = {}
        self.refs = {s: self._reference_stats(s) for s in c.eval.prompt_splits}
        self.amp = torch.bfloat16 if c.eval.amp == "bf16" else None

    # ------------------------------------------------------------------------------------ data

    def split(self, split: str):
        """The first ``reference_max`` items (default: all) of a split, loaded like the training data."""
        from deltafm.train.builders import load_training_data

        if split not in self._splits:
            data = dataclasses.replace(self.base.data, split=split, max_items=self.c.eval.reference_max)
            self._splits[split] = load_training_data(dataclasses.replace(self.base, data=data))
        return self._splits[split]

    def _reference_stats(self, split: str):
        """Reader statistics of the split's real images (cached under OUT/classifier, see the module docstring)."""
        from deltafm.eval.features import reference_statistics
        from deltafm.eval.metrics import load_reference_stats, save_reference_stats

        path = self.out / "classifier" / f"ref-attributes-{self.dataset}-{split}.npz"
        want = {"dataset": self.dataset, "split": split, "max_items": self.c.eval.reference_max,
                "canvas": self.shapes.canvas}
        ref = load_reference_stats(path) if path.is_file() else None
        if ref is not None and ref.meta.get("extractor") == self.extractor_id and \
                all(ref.meta.get(k) == v for k, v in want.items()):
            return ref
        ds = self.split(split)
        self.log(f"reference statistics of the reader on {len(ds)} {split} images -> {path}")
        ref = reference_statistics(self.reader, ds.images, meta=want, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_reference_stats(path, ref.mu, ref.sigma, ref.features, ref.meta)
        return ref

    def info(self) -> dict[str, Any]:
        """What classifier.json records: the reader, its held-out accuracies and the reference statistics."""
        m = self.reader.meta
        return {"scorer": "attributes", "path": str(self.c.eval.reader), "id": self.extractor_id,
                "dataset": self.dataset, "recipe": m.get("recipe"), "heldout": m.get("heldout"),
                "reference": {s: {"path": str(self.out / "classifier" / f"ref-attributes-{self.dataset}-{s}.npz"),
                                  **r.meta} for s, r in self.refs.items()}}

    def _conds(self, lm: Any):
        """The checkpoint's conditioning (:class:`deltafm.train.conditions.Conditions`), one per description."""
        from deltafm.train.conditions import Conditions
        from deltafm.train.errors import SetupError

        desc = lm.data.conditioning or {}
        key = json.dumps(desc, sort_keys=True)
        if key not in self._conditions:
            if desc.get("kind") not in ("text", "multi"):
                raise CompareError(f"checkpoint {lm.checkpoint} is not conditioned on text or named conditions; "
                                   "eval.scorer attributes scores those")
            try:
                self._conditions[key] = Conditions.from_description(desc)
            except SetupError as e:
                raise CompareError(f"checkpoint {lm.checkpoint}: {e}") from None
        return self._conditions[key]

    def prompts(self, lm: Any, split: str, num: int) -> Prompts:
        """The conditions of the first ``num`` items of ``split`` for this checkpoint (module docstring)."""
        conds = self._conds(lm)
        key = (json.dumps(lm.data.conditioning, sort_keys=True), split, num)
        if key not in self._prompts:
            ds = self.split(split)
            if len(ds) < num:
                raise CompareError(f"split {split!r} has {len(ds)} items; a unit asks for {num} prompts")
            self._prompts[key] = _text_prompts(conds, ds, num) if conds.kind == "text" else \
                _multi_prompts(conds, ds, num)
        return self._prompts[key]

    # ------------------------------------------------------------------------------------ units

    def score(self, images: np.ndarray, split: str, prompts: Prompts, kid_subsets: int = 0,
              kid_subset_size: int = 1000) -> dict[str, Any]:
        """The unit metrics (module docstring) of uint8 (N, 3, H, W) ``images`` asked for ``prompts`` (and
        ``kid``, in the reader's features, with ``kid_subsets`` > 0)."""
        from deltafm.eval.attributes_score import reader_fd, reader_kid, score_prompts, score_single_objects

        ref = self.refs[split]
        if prompts.captions is not None:
            s = score_prompts(self.reader, images, prompts.captions, self.shapes, ref=ref)
            out = {"fd": s["fd"], "prompt_acc": s["prompt_accuracy"], "agreement": s["agreement"]}
            out.update({f"acc.{k}": v for k, v in s["per_attribute"].items()})
        else:
            assert prompts.ids is not None
            s = score_single_objects(self.reader, images, prompts.ids, self.shapes)
            out = {"fd": reader_fd(self.reader, images, ref), "all_acc": s["all"]}
            out.update({f"acc.{k}": v for k, v in s["per_condition"].items()})
            out["one_object"] = s["one_object"]
        if kid_subsets > 0:
            out["kid"] = reader_kid(self.reader, images, ref, kid_subsets, kid_subset_size)
        return out

    def sample_unit(self, lm: Any, u: dict[str, Any], grid_to: Path | None = None) -> dict[str, Any]:
        """Draw ``u["num"]`` samples for the split's prompts with the unit's solver, NFE, guidance (joint scale
        ``w``, or weight ``w`` on part ``part`` only) and map; score them."""
        from deltafm.generate import generate
        from deltafm.pixels import model_to_uint8
        from deltafm.study.evaluator import Evaluator, over_seeds

        prompts = self.prompts(lm, u["split"], u["num"])
        cfg = {u["part"]: u["w"]} if u.get("part") else u["w"]

        def draw_and_score(seed: int, first: bool, kid: dict[str, int]) -> dict[str, Any]:
            try:
                x = generate(lm.model, labels=prompts.labels, shape=lm.shape, num_classes=None, solver=u["solver"],
                             steps=nfe_to_steps(u["solver"], u["nfe"]), cfg=cfg,
                             interval=tuple(u.get("interval", (0.0, 1.0))), correction=Evaluator.correction(lm, u),
                             seed=seed, batch_size=self.c.eval.batch_size, device=self.device,
                             path=lm.objective.path, amp_dtype=self.amp)
            except ValueError as e:  # guidance weights for parts the model lacks
                raise CompareError(f"checkpoint {lm.checkpoint}: {e}") from None
            images = model_to_uint8(x).numpy()
            if grid_to is not None and first:
                from deltafm.data.shapes_grid import save_captioned_grid

                grid_to.parent.mkdir(parents=True, exist_ok=True)
                k = min(len(images), 16)
                save_captioned_grid(images[:k], prompts.titles[:k], grid_to, ncols=4)
            return self.score(images, u["split"], prompts, **kid)

        return over_seeds(u, draw_and_score)

    def along_unit(self, lm: Any, u: dict[str, Any]) -> dict[str, Any]:
        raise CompareError("the along stage needs the classifier scorer")  # refused by the spec already


def load_checked_reader(c: CompareConfig):
    """The study's attribute reader, refused (one-line :class:`CompareError`) when it is missing, damaged or
    trained for another canvas than the arms' images (``data.image_size`` of the base config, default 32)."""
    from deltafm.data.shapes import ShapesConfig
    from deltafm.eval.attributes import load_reader
    from deltafm.eval.metrics import EvalInputError
    from deltafm.train.config import config_from_dict

    base = config_from_dict(apply_study_overrides(c))
    try:
        return load_reader(c.eval.reader, shapes=ShapesConfig(canvas=base.data.image_size or 32))
    except (FileNotFoundError, EvalInputError) as e:
        raise CompareError(f"eval.reader: {e}") from None


def _text_prompts(conds: Any, ds: Any, num: int) -> Prompts:
    """Captions of items 0..num-1: each distinct caption encoded once (one thread), gathered per batch."""
    import torch

    from deltafm.conditioning import Indexed

    ids = ds.caption_ids[:num].cpu()
    uniq, inverse = torch.unique(ids, return_inverse=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same features whatever the threads of this run
    try:
        table = conds.encode([ds.captions[int(i)] for i in uniq])
    finally:
        torch.set_num_threads(threads)
    captions = [ds.captions[int(i)] for i in ids]
    return Prompts(Indexed(table, inverse), captions, captions=captions)


def _multi_prompts(conds: Any, ds: Any, num: int) -> Prompts:
    """Conditions of items 0..num-1 in the parts the model is conditioned on (values matched by name)."""
    missing = [p for p in conds.values if p not in (ds.conditions or {})]
    if missing:
        raise CompareError(f"the model is conditioned on {missing}, which dataset {ds.name!r} does not hold")
    ids = {p: ds.conditions[p][:num].cpu().numpy() for p in conds.values}
    names = {p: ds.condition_values[p] for p in conds.values}
    rows = [{p: names[p][int(ids[p][i])] for p in conds.values} for i in range(num)]
    return Prompts(conds.from_values(rows), [" ".join(r.values()) for r in rows], ids=ids)
