"""Report pieces of studies scored with the attribute reader (``eval.scorer: attributes``): what the samples
are asked for and how they are scored (setup lines), and guidance on one part of a multi-condition at a time
(``eval.cfg.part_scales``)."""

from __future__ import annotations

from typing import Any

from deltafm.study import figures
from deltafm.study.markdown import pm, table
from deltafm.study.results import Results

__all__ = ["prompts_what", "reader_line", "section_part_cfg"]


def prompts_what(r: Results) -> str:
    """What sample i is conditioned on, for the setup's sampler line."""
    what = "caption" if r.conditioning == "text" else "conditions"
    splits = ", ".join(r.views())  # type: ignore[arg-type]
    return f"sample i conditioned on the {what} of item i of each prompt split: {splits}"


def _pct(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, int | float) else "?"


def reader_line(cls: dict[str, Any]) -> str:
    """The setup's metrics line: the reader, its held-out accuracy, the reference statistics per split."""
    held = (cls.get("heldout") or {}).get("heldout") or {}
    acc = (f"; its accuracy on held-out-pair scenes: shape {_pct(held.get('shape'))}, colour "
           f"{_pct(held.get('colour'))}, count {_pct(held.get('count'))}, caption agreement "
           f"{_pct(held.get('caption_agreement'))}" if held else "")
    refs = cls.get("reference") or {}
    ref = ", ".join(f"{s} ({m.get('count', '?')} images)" for s, m in refs.items())
    dim = next(iter(refs.values()), {}).get("feature_dim", "?")
    return (f"- Metrics: attribute reader `{cls.get('id', '?')[:29]}…` (`{cls.get('path')}`){acc}. Each sample is "
            f"read back into objects and checked against what it was asked for; FD in the reader's {dim}-d "
            f"features against the real images of the same split: {ref}.")


def section_part_cfg(R: Any) -> list[str]:
    """Guidance on one part at a time (the others unguided): reader-FD / all-conditions accuracy / the guided
    part's accuracy per variant and weight, and the figure of those against w."""
    r = R.r
    parts = r.parts()
    cfg_v = [v for v in R.present if any(r.part_cfg(v, s, p, "fd") for s in r.by_seed(v) for p in parts)]
    if not cfg_v:
        return []
    f = figures.plot_part_cfg(r, cfg_v, parts, R.fig_dir / f"{R.tag}-part-cfg.png",
                              f"{R.name}: guidance on one condition (mean ± sd)", R.acc, R.labels)
    lines = [f"{R.h} Guidance on one condition at a time ({R.name}; {R.ev['cfg']['solver']} NFE "
             f"{R.ev['cfg']['nfe']}, {R.ev['cfg']['num']} samples)", ""] + R.figure(f, "per-part cfg")
    cols = [(p, w) for p in parts for w in sorted({w for v in cfg_v for s in r.by_seed(v)
                                                   for w, _ in r.part_cfg(v, s, p, "fd")})]
    rows = []
    for v in cfg_v:
        cells = [v]
        for p, w in cols:
            got = [[dict(r.part_cfg(v, s, p, m)).get(w) for s in r.by_seed(v)] for m in ("fd", R.acc, f"acc.{p}")]
            cells.append(f"{pm(got[0])} / {pm(got[1], 2)} / {pm(got[2], 2)}")
        rows.append(cells)
    lines += [f"{R.label('fd')} / {R.label(R.acc)} / accuracy of the guided condition, guiding that condition "
              "alone with weight w (v(c) + (w − 1)(v(c) − v(c without it)); the other conditions unguided):", ""]
    return lines + table(["variant"] + [f"{p} w={w:g}" for p, w in cols], rows) + [""]
