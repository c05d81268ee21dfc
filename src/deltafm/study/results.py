"""Reading a ``results.json`` (format ``deltafm.compare.v1``, written by :mod:`deltafm.study.run`): the
curves of each variant and seed, as (x, y) pairs, for the figures and the tables of the report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["VIEWS", "Results", "mean_band"]

#: The three views of the along-the-path stage, with the label the report gives them.
VIEWS = {
    "trajectory": "own Euler path, conditioned on y",
    "noised_class": "noised test images, conditioned on y",
    "noised_null": "noised test images, null label",
}

Curve = list[tuple[float, float]]


def mean_band(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Abscissae (the union over curves), mean and sample std (0 for one value) of the curves at each."""
    xs = sorted({x for c in curves for x, _ in c})
    mean, std = [], []
    for x in xs:
        vals = [y for c in curves for xx, y in c if xx == x]
        mean.append(np.mean(vals))
        std.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
    return np.array(xs, dtype=float), np.array(mean), np.array(std)


class Results:
    """A results.json: its study, its runs, and per-variant and per-seed accessors.

    Studies scored with the attribute reader hold one row per prompt split (``split``) in each stage; a
    :meth:`view` sees only the rows of one split, so every accessor below reads that split's numbers."""

    def __init__(self, data: dict[str, Any], view: str | None = None) -> None:
        self.data = data
        self.study = data["study"]
        self.name = self.study["name"]
        self.arms = {a["name"]: a for a in self.study["arms"]}
        self.variant_arm = {v["name"]: a["name"] for a in self.study["arms"] for v in a["variants"]}
        self.runs = data.get("runs", [])
        self.split = view

    @property
    def scorer(self) -> str:
        return self.study["eval"].get("scorer", "classifier")

    @property
    def conditioning(self) -> str:
        """What the arms are conditioned on: ``class``, ``text`` or ``multi`` (one kind per study)."""
        return next((a["conditioning"] for a in self.study["arms"] if "conditioning" in a), "class")

    def views(self) -> list[str | None]:
        """The prompt splits of an attribute-scored study (in the study's order); ``[None]`` otherwise."""
        return list(self.study["eval"].get("prompt_splits") or ["test"]) if self.scorer == "attributes" else [None]

    def view(self, split: str | None) -> Results:
        """The same results, seeing only the rows of prompt split ``split`` (None: every row)."""
        return Results(self.data, split)

    def variants(self) -> list[str]:
        return [v["name"] for a in self.study["arms"] for v in a["variants"]]

    def baseline_of(self, variant: str) -> str:
        return self.arms[self.variant_arm[variant]]["baseline"]

    def by_seed(self, variant: str) -> dict[int, dict[str, Any]]:
        arm = self.variant_arm[variant]
        out = {r["seed"]: r["variants"][variant] for r in self.runs if r["arm"] == arm and variant in r["variants"]}
        if self.split is None:
            return out
        keep = {s: {**v, **{st: [row for row in v[st] if row.get("split") == self.split]
                             for st in ("curve", "sweep", "cfg")}} for s, v in out.items()}
        return {s: v for s, v in keep.items() if v["curve"] or v["sweep"] or v["cfg"]}

    def curve(self, variant: str, seed: int, metric: str) -> Curve:
        v = self.by_seed(variant).get(seed)
        if not v:
            return []
        return [(r["images"], r[metric]) for r in v["curve"] if r.get(metric) is not None]

    def final_rows(self, variant: str, has: Callable[[dict[str, Any]], bool]) -> dict[int, dict[str, Any]]:
        """Per seed: the last curve row at total_images for which ``has(row)`` holds (seeds without one are
        left out): the one rule for "the end of training" that :meth:`final` and the sampling-error table read."""
        total = self.study["total_images"]
        out = {}
        for seed, v in self.by_seed(variant).items():
            pts = [r for r in v["curve"] if r["images"] == total and has(r)]
            if pts:
                out[seed] = pts[-1]
        return out

    def final(self, variant: str, metric: str) -> dict[int, float]:
        """Per seed: the metric at the last curve point (only seeds whose curve reached total_images)."""
        return {s: row[metric] for s, row in self.final_rows(variant, lambda r: r.get(metric) is not None).items()}

    def sweep(self, variant: str, seed: int, solver: str, metric: str) -> Curve:
        v = self.by_seed(variant).get(seed)
        if not v:
            return []
        return [(r["nfe"], r[metric]) for r in v["sweep"] if r["solver"] == solver and r.get(metric) is not None]

    def cfg(self, variant: str, seed: int, metric: str) -> Curve:
        """(w, metric) of the joint guidance scales (rows without a guided ``part``)."""
        v = self.by_seed(variant).get(seed)
        if not v:
            return []
        return [(r["w"], r[metric]) for r in v["cfg"] if r.get(metric) is not None and r.get("part") is None]

    def part_cfg(self, variant: str, seed: int, part: str, metric: str) -> Curve:
        """(w, metric) of the units that guide only ``part`` with weight w."""
        v = self.by_seed(variant).get(seed)
        if not v:
            return []
        return [(r["w"], r[metric]) for r in v["cfg"] if r.get(metric) is not None and r.get("part") == part]

    def parts(self) -> list[str]:
        """The parts guided on their own in some unit, in order of first appearance."""
        seen: dict[str, None] = {}
        for run in self.runs:
            for v in run["variants"].values():
                for r in v["cfg"]:
                    if r.get("part") is not None:
                        seen.setdefault(r["part"], None)
        return list(seen)

    def along(self, variant: str, view: str) -> list[Curve]:
        """Per seed with results: the (t, accuracy) curve of one along-the-path view."""
        out = []
        for run in self.by_seed(variant).values():
            a = run.get("along")
            if a and view in a:
                out.append(list(zip(a[view]["t"], a[view]["acc"])))
        return out

    def seed_curves(self, variant: str, curve: Any, *args: Any) -> list[Curve]:
        """The non-empty per-seed curves ``curve(variant, seed, *args)`` (one of the accessors above)."""
        curves = [curve(variant, s, *args) for s in self.by_seed(variant)]
        return [c for c in curves if c]
