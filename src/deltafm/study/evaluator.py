"""Sampling and scoring of one checkpoint's variants: the feature classifier, the reference statistics,
and the two kinds of units (``sample_unit``: draw samples and score them; ``along_unit``: classifier
accuracy of the predicted clean sample along t).

Every image the study reads (the classifier's training split, the reference split, the test images of
the along-the-path views) comes from :func:`deltafm.train.builders.load_training_data`, the builder
training uses, with the base config's data section (name, root, image size, channels) and only the split
changed. Samples are scored by :func:`deltafm.eval.features.evaluate_samples` with :data:`SCORING`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltafm.correction import correction_window
from deltafm.solvers import nfe_to_steps
from deltafm.study.spec import CompareConfig, CompareError, apply_study_overrides

__all__ = ["SCORING", "Evaluator", "combine_seeds", "over_seeds", "unit_metrics", "unit_seeds"]

#: How the study scores samples (arguments of ``evaluate_samples``): FD by the eigendecomposition form of
#: tr((Σ₁Σ₂)^{1/2}) (exact for covariance matrices, ~100x faster than ``scipy.linalg.sqrtm`` on
#: rank-deficient 128x128 products), IS over one split, precision/recall against an equally large seeded
#: subset of the reference features. ``deltafm eval eval --fd-method eigh --splits 1 --pr-max match``
#: scores a samples file the same way.
SCORING: dict[str, Any] = {"fd_method": "eigh", "splits": 1, "pr_max": "match", "seed": 0}


def unit_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The metric keys of a study unit (fd, class_acc, is, precision, recall, and kid when computed) from
    ``evaluate_samples``."""
    out = {"fd": result["fd"], "class_acc": result["class_accuracy"]["overall"], "is": result["inception_score"]}
    if "precision" in result:
        out["precision"], out["recall"] = result["precision"], result["recall"]
    if "kid" in result:
        out["kid"] = result["kid"]
    return out


def unit_seeds(u: dict[str, Any]) -> list[int]:
    """The sampling-noise seeds of a unit: ``seeds`` (eval.sample_seeds) or the one ``seed``."""
    return [int(s) for s in u["seeds"]] if "seeds" in u else [int(u["seed"])]


def over_seeds(u: dict[str, Any],
               draw_and_score: Callable[[int, bool, dict[str, int]], dict[str, Any]]) -> dict[str, Any]:
    """A sampling unit's metrics: ``draw_and_score(seed, first, kid)`` for each of its noise seeds (``first``:
    the seed whose samples go into the grid; ``kid``: the unit's KID settings as keyword arguments of the
    scorer), combined by :func:`combine_seeds`, with the wall-clock ``seconds``."""
    t0 = time.perf_counter()
    kid = {"kid_subsets": u.get("kid_subsets", 0), "kid_subset_size": u.get("kid_subset_size", 1000)}
    per_seed = [draw_and_score(seed, i == 0, kid) for i, seed in enumerate(unit_seeds(u))]
    return {**combine_seeds(per_seed), "seconds": round(time.perf_counter() - t0, 2)}


def combine_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One unit's metrics from the metrics of each sampling seed: every numeric key is the mean over the
    seeds; with more than one seed, ``per_seed`` maps each key to its per-seed values (in seed order)."""
    if len(per_seed) == 1:
        return dict(per_seed[0])
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: float(sum(m[k] for m in per_seed) / len(per_seed)) for k in keys}
    out["per_seed"] = {k: [m[k] for m in per_seed] for k in keys}
    return out


class Evaluator:
    """Classifier, reference statistics and the sampling/scoring of one checkpoint's variants."""

    def __init__(self, c: CompareConfig, out: Path, device: str, log: Callable[[str], None],
                 classifier: str | None = None) -> None:
        import torch

        from deltafm.train.config import config_from_dict

        self.c, self.out, self.device, self.log = c, out, device, log
        self.base = config_from_dict(apply_study_overrides(c))
        self.dataset = self.base.data.name
        self._splits: dict[str, Any] = {}
        self.classifier_path = self._ensure_classifier(classifier or c.eval.classifier)
        from deltafm.eval.classifier import load_classifier

        self.classifier = load_classifier(self.classifier_path).to(device).eval()
        self.extractor_id = self.classifier.extractor_id
        acc = self.classifier.meta.get("test_accuracy")
        log(f"classifier {self.classifier_path} ({self.extractor_id[:23]}...), test accuracy {acc}")
        self.reference_path = str(out / "classifier" / f"ref-{self.dataset}-{c.eval.reference_split}.npz")
        self.ref = self._reference_stats(Path(self.reference_path))
        self.amp = torch.bfloat16 if c.eval.amp == "bf16" else None

    # ------------------------------------------------------------------------------------ data, classifier

    def split(self, split: str):
        """A split of the study's dataset (cached), loaded like the training data (root, size, channels)."""
        from deltafm.train.builders import load_training_data

        if split not in self._splits:
            data = dataclasses.replace(self._pixel_data(), split=split, max_items=None)
            self._splits[split] = load_training_data(dataclasses.replace(self.base, data=data))
        return self._splits[split]

    def _pixel_data(self):
        """The data section the classifier and reference statistics read: the arms' own, or ``eval.images``
        for arms trained on latents (their samples are decoded to those pixels)."""
        from deltafm.train.config import DataConfig

        images = self.c.eval.images
        if self.base.data.name != "latents":
            if images is not None:
                raise CompareError("eval.images is for arms trained on latents; these arms train on "
                                   f"{self.base.data.name!r} and are scored on it")
            return self.base.data
        if images is None:
            raise CompareError("the arms train on latents: set eval.images to the pixel dataset they were encoded "
                               "from (e.g. eval.images: {name: fashion-mnist}); the samples are decoded and scored "
                               "against it")
        try:
            return DataConfig(**images)
        except TypeError as e:
            raise CompareError(f"eval.images: {e} (keys of the training config's data section)") from None

    def _ensure_classifier(self, path: str | None) -> str:
        """The classifier weights: ``path``, or trained once on the train split into OUT/classifier."""
        from deltafm.eval.classifier import save_classifier, train_classifier

        if path is not None:
            return str(path)
        path = str(self.out / "classifier" / f"{self.dataset}-classifier.safetensors")
        if not Path(path).is_file():
            e = self.c.eval
            self.log(f"training the feature classifier on the {self.dataset} train split "
                     f"({e.classifier_epochs} epochs) -> {path}")
            model = train_classifier(self.split("train"), epochs=e.classifier_epochs, seed=e.classifier_seed,
                                     dataset_test=self.split(e.reference_split), progress=False)
            save_classifier(model, path)
        return path

    def reference_images(self):
        """The real images the reference statistics are computed from: the first ``eval.reference_max`` (default:
        all) of the ``eval.reference_split`` split."""
        e = self.c.eval
        images = self.split(e.reference_split).images
        return images if e.reference_max is None else images[: e.reference_max]

    def _reference_stats(self, ref_path: Path):
        """Reference statistics of the reference split (recomputed when the classifier, the number of
        items or the data folder changed)."""
        from deltafm.eval.features import reference_statistics
        from deltafm.eval.metrics import load_reference_stats, save_reference_stats

        e, root = self.c.eval, self.base.data.root
        ref = load_reference_stats(ref_path) if ref_path.is_file() else None
        if ref is not None and ref.meta.get("extractor") == self.extractor_id and \
                ref.meta.get("max_items") == e.reference_max and ref.meta.get("root") == root:
            return ref
        images = self.reference_images()
        meta = {"dataset": self.dataset, "split": e.reference_split, "max_items": e.reference_max}
        if root is not None:
            meta["root"] = root
        ref = reference_statistics(self.classifier, images, meta=meta, device=self.device, progress=False)
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        save_reference_stats(ref_path, ref.mu, ref.sigma, ref.features, ref.meta)
        return ref

    def info(self) -> dict[str, Any]:
        m = self.classifier.meta
        return {"path": self.classifier_path, "id": self.extractor_id, "test_accuracy": m.get("test_accuracy"),
                "dataset": m.get("dataset"), "recipe": m.get("recipe"), "train_seconds": m.get("train_seconds"),
                "reference": {"path": self.reference_path, **self.ref.meta}}

    # ------------------------------------------------------------------------------------ units

    @staticmethod
    def correction(lm: Any, u: dict[str, Any]):
        """The BiasCorrection of a unit's variant (None for raw sampling), as the checkpoint decides it."""
        window = correction_window(u.get("correction", "always"), tuple(u.get("interval", (0.0, 1.0))))
        try:
            return lm.correction(u["map"], u.get("lam"), interval=window)
        except ValueError as e:
            raise CompareError(str(e)) from None

    def score(self, images: Any, labels: Any, kid_subsets: int = 0, kid_subset_size: int = 1000) -> dict[str, Any]:
        """FD, class accuracy, IS, precision/recall (and KID with ``kid_subsets`` > 0) of uint8 NHWC samples
        generated for ``labels`` (:func:`~deltafm.eval.features.evaluate_samples` with :data:`SCORING`)."""
        from deltafm.eval.features import evaluate_samples

        result = evaluate_samples(self.classifier, images, self.ref, labels=labels, layout="NHWC", k=self.c.eval.pr_k,
                                  batch_size=self.c.eval.batch_size, device=self.device, progress=False,
                                  kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, **SCORING)
        return unit_metrics(result)

    def sample_unit(self, lm: Any, u: dict[str, Any], grid_to: Path | None = None) -> dict[str, Any]:
        """Draw ``u["num"]`` class-balanced samples with the unit's solver, NFE, guidance and map for each of
        its sampling seeds; score each set (:func:`combine_seeds`). The grid shows the first seed's."""
        from deltafm.generate import generate, labels_for
        from deltafm.images import save_grid

        k = lm.data.num_classes
        labels = labels_for(u["num"], k)

        def draw_and_score(seed: int, first: bool, kid: dict[str, int]) -> dict[str, Any]:
            x = generate(lm.model, labels=labels, shape=lm.shape, num_classes=k, solver=u["solver"],
                         steps=nfe_to_steps(u["solver"], u["nfe"]), cfg=u["w"],
                         interval=tuple(u.get("interval", (0.0, 1.0))), correction=self.correction(lm, u),
                         seed=seed, batch_size=self.c.eval.batch_size, device=self.device,
                         path=lm.objective.path, amp_dtype=self.amp)
            imgs = self._decoder(lm)(x)
            if grid_to is not None and first:
                order = [i for c_ in range(k) for i in range(c_, min(len(imgs), 10 * k), k)]
                save_grid(imgs[order], grid_to, ncol=10)
            return self.score(imgs, labels.numpy(), **kid)

        return over_seeds(u, draw_and_score)

    def _decoder(self, lm: Any) -> Callable[[Any], Any]:
        """Model-space samples -> uint8 NHWC images: the pixel map, or the VAE of a latent model."""
        from deltafm.pixels import to_uint8_nhwc

        if lm.data.kind != "latents":
            return to_uint8_nhwc
        from deltafm.vae import AutoencoderError
        from deltafm.vae.decoding import decode_uint8, find_decoder

        try:
            ae, why = find_decoder(lm.data.vae_source, lm.data.vae_identity, self.c.eval.vae, self.device)
        except AutoencoderError as e:
            raise CompareError(f"eval.vae: {e}") from None
        if ae is None:
            raise CompareError(f"checkpoint {lm.checkpoint}: cannot decode its samples: {why}")
        return lambda x: decode_uint8(ae, x, batch_size=self.c.eval.batch_size)

    def test_subset(self, num: int):
        """``num`` test images (model space) and labels: a fixed seeded subset of the reference split."""
        import torch

        from deltafm.pixels import uint8_to_model

        ds = self.split(self.c.eval.reference_split)
        g = torch.Generator().manual_seed(12345)
        idx = torch.randperm(len(ds), generator=g)[:num].sort().values
        return uint8_to_model(ds.images[idx]), ds.labels[idx]

    def along_unit(self, lm: Any, u: dict[str, Any]) -> dict[str, Any]:
        """Classifier accuracy of x̂1 along t: own trajectory, noised test images with and without labels."""
        from deltafm.eval.along_path import noised_accuracy, trajectory_accuracy
        from deltafm.generate import labels_for

        if lm.data.kind == "latents":
            raise CompareError("the along stage scores noised test images in the model's space; it is for pixel "
                               "arms, not arms trained on latents (drop 'along' from the arms' stages)")
        t0 = time.perf_counter()
        k = lm.data.num_classes
        common = dict(num_classes=k, path=lm.objective.path, correction=self.correction(lm, u), seed=unit_seeds(u)[0],
                      batch_size=self.c.eval.batch_size, amp_dtype=self.amp, device=self.device)
        x1, y = self.test_subset(u["num"])
        times = list(u["times"])
        acc_c = noised_accuracy(lm.model, self.classifier, x1, y, times, null_label=False, **common)
        acc_n = noised_accuracy(lm.model, self.classifier, x1, y, times, null_label=True, **common)
        tt, acc_t = trajectory_accuracy(lm.model, self.classifier, labels_for(u["num"], k), lm.shape,
                                        steps=u["steps"], **common)
        return {"trajectory": {"t": tt, "acc": acc_t}, "noised_class": {"t": times, "acc": acc_c},
                "noised_null": {"t": times, "acc": acc_n}, "seconds": round(time.perf_counter() - t0, 2)}
