"""What every section of the study report needs (:class:`ReportContext`): the results (one prompt split of an
attribute-scored study at a time), the variant lists, headings, where figures go, and which metrics the
scorer gives.

Metrics by scorer: the classifier's (:data:`~deltafm.study.ratios.METRICS`, main accuracy ``class_acc``); the
attribute reader's for text arms (:data:`~deltafm.study.ratios.PROMPT_METRICS`, main accuracy ``prompt_acc``)
or multi-condition arms (:data:`~deltafm.study.ratios.CONDITION_METRICS`, main accuracy ``all_acc``). Headings
of a prompt split's sections read "NAME, SPLIT prompts" and its figure files are named "NAME-SPLIT-...".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltafm.study.ratios import CONDITION_METRICS, METRICS, PROMPT_METRICS
from deltafm.study.results import Results

__all__ = ["ReportContext", "metric_table"]

#: conditioning kind -> (metric table, main accuracy key, its short label)
_BY_KIND: dict[str, tuple[dict[str, tuple[str, bool]], str, str]] = {
    "class": (METRICS, "class_acc", "class acc"),
    "text": (PROMPT_METRICS, "prompt_acc", "prompt acc"),
    "multi": (CONDITION_METRICS, "all_acc", "all-conditions acc"),
}


def metric_table(r: Results) -> tuple[dict[str, tuple[str, bool]], str, str]:
    """(metric key -> (label, lower is better), main accuracy key, its short label) of the study's scorer."""
    return _BY_KIND["class" if r.scorer != "attributes" else ("text" if r.conditioning == "text" else "multi")]


@dataclass
class ReportContext:
    """What every section needs: the results, the variant lists, headings, where figures go, the metrics."""

    r: Results
    h: str
    fig_dir: Path
    link: Callable[[str], str]
    samples_dir: Path | None

    @property
    def st(self) -> dict[str, Any]:
        return self.r.study

    @property
    def ev(self) -> dict[str, Any]:
        return self.r.study["eval"]

    @property
    def name(self) -> str:
        """The study's name in headings (with the prompt split of a view)."""
        return self.r.name if self.r.split is None else f"{self.r.name}, {self.r.split} prompts"

    @property
    def tag(self) -> str:
        """The study's name in figure files (with the prompt split of a view)."""
        return self.r.name if self.r.split is None else f"{self.r.name}-{self.r.split}"

    @property
    def present(self) -> list[str]:
        return [v for v in self.r.variants() if self.r.by_seed(v)]

    @property
    def main(self) -> list[str]:
        return [v for v in (self.st.get("main_variants") or self.r.variants()) if v in self.present]

    @property
    def labels(self) -> dict[str, tuple[str, bool]]:
        """Every metric of the scorer: key -> (label, lower is better)."""
        return metric_table(self.r)[0]

    @property
    def metrics(self) -> dict[str, tuple[str, bool]]:
        """The metrics of the final-quality table: those of the scorer that some curve point has."""
        table = self.labels
        have = {k for v in self.present for run in self.r.by_seed(v).values() for row in run["curve"]
                for k, x in row.items() if x is not None}
        return {k: m for k, m in table.items() if k in have}

    @property
    def acc(self) -> str:
        """The main accuracy metric (shown next to FD everywhere)."""
        return metric_table(self.r)[1]

    @property
    def acc_short(self) -> str:
        return metric_table(self.r)[2]

    def label(self, metric: str) -> str:
        return self.labels[metric][0]

    def lower(self, metric: str) -> bool:
        """Whether lower is better for ``metric``."""
        return self.labels[metric][1]

    def figure(self, path: Path | None, alt: str) -> list[str]:
        return [f"![{alt}]({self.link(path.name)})", ""] if path else []
