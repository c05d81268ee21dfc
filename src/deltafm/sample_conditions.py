"""``deltafm sample`` for text-to-image and multi-condition models: what to sample, and its final files.

**Text models** (``conditioning.kind=text``): the prompts are ``--prompt TEXT`` (repeatable, in order) or
``--prompts FILE`` (one a line, stripped; blank lines and lines starting with ``#`` skipped). They are
encoded once, on one CPU thread (the same features on every rank and in every run), by the checkpoint's
text encoder: reloaded from its recorded folder, or ``--text-encoder DIR``; its identity must be the one
the model was trained with.

**Multi-condition models** (``conditioning.kind=multi``): one group of values, ``--condition NAME=VALUE``
(repeatable; every sample gets them), or ``--conditions FILE`` (one group a line: ``shape=circle
colour=red``; blank and ``#`` lines skipped). A part a group does not name is null (unconditional in that
part). CFG: with ``--guidance NAME=W`` or the checkpoint's ``conditioning.guidance``, one weight per part
(compositional CFG; per part: its ``--guidance``, else the checkpoint's weight, else ``--cfg``); with
neither, the one ``--cfg`` scale (joint CFG: every part nulled at once).

**Which sample gets what.** P prompts (or groups): sample i gets prompt i mod P (balanced, in order, as
class ids are). ``--num`` defaults to P × ``--per-prompt`` (default 4); giving both is an error. The
samples are an :class:`~deltafm.conditioning.Indexed` condition (P encoded rows, N ids): memory does not
grow with ``--num``. The chunks depend on the seed, the batch size and the prompts only, so torchrun's
split is unchanged; the settings a resumed run must match hold a digest of the prompts (groups) and the
guidance weights.

**Output.** ``grid.png``: the first 64 samples, each under its prompt (values) as title, one column per
prompt when there are at most 8; ``samples.npz``: ``arr_0`` (ADM layout) and ``prompt_ids`` (text) or
``condition_ids`` plus ``cond.<name>`` per part (value ids; the null id = the number of values); sample.json
records the prompts (groups) and the guidance. No per-class grids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deltafm.sample_options import OptionError

__all__ = ["PER_PROMPT", "GRID_MAX", "Given", "Request", "read_given", "resolve_request", "write_conditioned"]

PER_PROMPT = 4  # samples per prompt (or condition group) when --num is not given
GRID_MAX = 64  # samples shown in grid.png


# ----------------------------------------------------------------------------------------------- given


@dataclass
class Given:
    """The conditioning options as given (files read, syntax checked; the model not yet consulted)."""

    prompts: list[str] | None  # text prompts, in order
    prompt_wheres: list[str]  # where each prompt came from (for errors)
    groups: list[dict[str, str]] | None  # multi: {name: value} per group
    group_wheres: list[str]
    guidance: dict[str, float]  # --guidance NAME=W

    def flag(self, which: str) -> str:
        """The option that gave the prompts / groups."""
        wheres = self.prompt_wheres if which == "prompts" else self.group_wheres
        return wheres[0].split()[0] if wheres else ""


def _lines(path: Path, flag: str, what: str) -> list[tuple[str, str]]:
    """(where, stripped line) of the entries of a prompts / conditions file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OptionError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise OptionError(f"{flag} {path} is a folder; give a text file, one {what} a line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"{flag} {path}: cannot read it as UTF-8 text ({e})") from None
    out = [(f"{flag} {path} line {k}", line.strip()) for k, line in enumerate(text.splitlines(), 1)
           if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise OptionError(f"{flag} {path} has no {what}s (blank lines and lines starting with # are skipped)")
    return out


def _pairs(tokens: list[str], where: str) -> dict[str, str]:
    """``NAME=VALUE`` tokens -> {name: value} (each name once)."""
    out: dict[str, str] = {}
    for tok in tokens:
        name, eq, value = tok.partition("=")
        if not eq or not name or not value:
            raise OptionError(f"{where}: {tok!r} is not NAME=VALUE (e.g. shape=circle)")
        if name in out:
            raise OptionError(f"{where}: condition {name!r} given twice")
        out[name] = value
    return out


def _weights(items: list[str] | None) -> dict[str, float]:
    """``--guidance NAME=W`` -> {name: w}, each w finite and >= 0."""
    out: dict[str, float] = {}
    for item in items or []:
        name, eq, text = item.partition("=")
        try:
            w = float(text) if eq and name else math.nan
        except ValueError:
            w = math.nan
        if not eq or not name or not (math.isfinite(w) and w >= 0):
            raise OptionError(f"--guidance {item}: expected NAME=W with a finite weight W >= 0 (e.g. shape=3)")
        if name in out:
            raise OptionError(f"--guidance {name}: given twice")
        out[name] = w
    return out


def read_given(args: argparse.Namespace) -> Given:
    """Read ``--prompt(s)`` / ``--condition(s)`` / ``--guidance`` / ``--per-prompt`` (files included) and check
    what needs no model: one source each, no empty prompt, NAME=VALUE syntax, weights, --per-prompt."""
    if args.prompt is not None and args.prompts is not None:
        raise OptionError("give --prompt or --prompts FILE, not both")
    if args.condition is not None and args.conditions is not None:
        raise OptionError("give --condition or --conditions FILE, not both")
    if args.per_prompt is not None:
        if args.per_prompt < 1:
            raise OptionError(f"--per-prompt must be >= 1, got {args.per_prompt}")
        if args.num is not None:
            raise OptionError("--per-prompt sets the number of samples when --num is not given; give one of them")
    prompts = groups = None
    pw: list[str] = []
    gw: list[str] = []
    if args.prompt is not None:
        prompts = list(args.prompt)
        pw = [f"--prompt {k}" if len(prompts) > 1 else "--prompt" for k in range(1, len(prompts) + 1)]
        for where, p in zip(pw, prompts):
            if not p.strip():
                raise OptionError(f"{where} is empty; give a text (unconditional samples: --cfg 0)")
    elif args.prompts is not None:
        lines = _lines(args.prompts, "--prompts", "prompt")
        pw, prompts = [w for w, _ in lines], [line for _, line in lines]
    if args.condition is not None:
        gw = ["--condition " + " ".join(args.condition)]
        groups = [_pairs(list(args.condition), "--condition")]
    elif args.conditions is not None:
        lines = _lines(args.conditions, "--conditions", "condition line")
        gw, groups = [w for w, _ in lines], [_pairs(line.split(), w) for w, line in lines]
    return Given(prompts, pw, groups, gw, _weights(args.guidance))


# ----------------------------------------------------------------------------------------------- request


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Request:
    """What a text or multi-condition model is sampled with: P prompts (groups), their encoded table."""

    kind: str  # "text" or "multi"
    groups: list[Any]  # prompts (str) or {name: value} per group
    table: Any  # the P rows: a TextCond or a MultiCond
    guidance: dict[str, float]  # multi: --guidance over the checkpoint's conditioning.guidance
    info: dict[str, Any]  # text: the encoder's identity and max_tokens; multi: the values per part

    @property
    def count(self) -> int:
        return len(self.groups)

    @property
    def titles(self) -> list[str]:
        if self.kind == "text":
            return list(self.groups)
        return [" ".join(f"{k}={v}" for k, v in g.items()) for g in self.groups]

    def ids(self, num: int):
        """Group of each sample: i mod P."""
        import torch

        return torch.arange(num, dtype=torch.long) % self.count

    def labels(self, num: int):
        """The N conditions: rows ``i mod P`` of the table, gathered per batch."""
        from deltafm.conditioning import Indexed

        return Indexed(self.table, self.ids(num))

    def cfg(self, scale: float) -> float | dict[str, float]:
        """The CFG argument of :func:`deltafm.generate.generate`: one weight per part (compositional) when any
        part has a weight of its own, else the one scale."""
        from deltafm.train.conditions import part_weights

        return part_weights(self.info["values"], self.guidance, scale) if self.kind == "multi" else scale

    def settings(self, scale: float) -> dict[str, Any]:
        """What a resumed run must match besides the class-model settings."""
        key = "prompts_sha256" if self.kind == "text" else "conditions_sha256"
        w = self.cfg(scale)
        return {"conditioning": self.kind, key: _digest(self.groups), "groups": self.count,
                "guidance": w if isinstance(w, dict) else None}

    def meta(self, scale: float) -> dict[str, Any]:
        """What sample.json records besides the class-model settings."""
        w = self.cfg(scale)
        if self.kind == "text":
            return {"conditioning": "text", **self.info, "prompts": list(self.groups)}
        return {"conditioning": "multi", "conditions": [dict(g) for g in self.groups],
                "guidance": w if isinstance(w, dict) else None, "condition_values": self.info["values"]}


def _kind_errors(args: argparse.Namespace, given: Given, kind: str, parts: list[str]) -> None:
    """Options that do not fit what the model is conditioned on."""
    if kind == "class":
        what, use = "class ids", "use --class C (or nothing: balanced classes) and --cfg"
    elif kind == "text":
        what, use = "text", "give --prompt TEXT (repeatable) or --prompts FILE"
    else:
        what = f"named class-id conditions ({', '.join(parts)})"
        use = "give --condition NAME=VALUE (repeatable) or --conditions FILE"
    wrong = [(flag, bad) for flag, bad in (
        ("--class", args.class_id is not None and kind != "class"),
        (given.flag("prompts"), given.prompts is not None and kind != "text"),
        (given.flag("groups"), given.groups is not None and kind != "multi"),
        ("--text-encoder", args.text_encoder is not None and kind != "text"),
        ("--guidance", bool(given.guidance) and kind != "multi"),
        ("--per-prompt", args.per_prompt is not None and kind == "class"),
    ) if bad]
    if wrong:
        flag = wrong[0][0]
        use = {"--guidance": "one guidance scale: --cfg", "--per-prompt": "give --num"}.get(flag, use)
        raise OptionError(f"{flag}: this model is conditioned on {what}; {use}")
    if kind != "class" and given.prompts is None and given.groups is None:
        raise OptionError(f"this model is conditioned on {what}: {use}")


def _multi(conds, given: Given, lm) -> Request:
    """Check the groups and weights against the model's parts and values."""
    values = {k: list(v) for k, v in conds.values.items()}
    for where, group in zip(given.group_wheres, given.groups or []):
        for name, value in group.items():
            if name not in values:
                raise OptionError(f"{where}: unknown condition {name!r}; the model is conditioned on "
                                  f"{', '.join(values)}")
            if value not in values[name]:
                raise OptionError(f"{where}: {value!r} is not a value of {name} ({', '.join(values[name])})")
    unknown = sorted(set(given.guidance) - set(values))
    if unknown:
        raise OptionError(f"--guidance {unknown[0]}=...: the model has no condition {unknown[0]!r} (it has "
                          f"{', '.join(values)})")
    guidance = {**{k: float(w) for k, w in lm.config.conditioning.guidance.items()}, **given.guidance}
    groups = list(given.groups or [])
    return Request("multi", groups, conds.from_values(groups), guidance, {"values": values})


def _text(conds, given: Given) -> Request:
    """Check each prompt with the encoder's tokenizer (too long: its error), then encode them on one thread."""
    import torch

    max_tokens = int(conds.text["max_tokens"])
    prompts = list(given.prompts or [])
    for where, p in zip(given.prompt_wheres, prompts):
        try:
            conds.encoder.tokenize([p], max_tokens)
        except ValueError as e:
            why = str(e).replace("caption 0 ", "the prompt ").replace(" or pass truncate=True", "")
            raise OptionError(f"{where}: {why}") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same features whatever the threads of this run or rank
    try:
        table = conds.encode(prompts)
    finally:
        torch.set_num_threads(threads)
    info = {"text_encoder": conds.text["identity"], "max_tokens": max_tokens}
    return Request("text", prompts, table, {}, info)


def resolve_request(args: argparse.Namespace, lm, given: Given) -> Request | None:
    """The request of a text or multi-condition model (None for class ids) from the options as given
    (:func:`read_given`); every option that does not fit the model, an unknown name or value, a prompt the
    encoder refuses: an :class:`OptionError`."""
    from deltafm.train.conditions import Conditions
    from deltafm.train.errors import SetupError

    desc = lm.data.conditioning or {}
    kind = desc.get("kind", "class")
    _kind_errors(args, given, kind, list(desc.get("values", {})))
    if kind == "class":
        return None
    if kind == "multi":
        return _multi(Conditions.from_description(desc), given, lm)
    try:
        conds = Conditions.from_description(desc, encoder_spec=args.text_encoder)
    except SetupError as e:
        where = (f"--text-encoder {args.text_encoder}" if args.text_encoder is not None else
                 "the checkpoint's text encoder (or pass the same one with --text-encoder DIR)")
        raise OptionError(f"{where}: {e}") from None
    return _text(conds, given)


# ----------------------------------------------------------------------------------------------- output


def write_conditioned(store, out: Path, request: Request, meta: dict[str, Any], images: bool) -> str:
    """The final files of a finished store of a text / multi-condition model: ``grid.png`` (the first
    :data:`GRID_MAX` samples under their prompts), ``samples.npz`` (``latents.npz`` for undecoded latents)
    with the ids of each sample's prompt (group), then sample.json (last). Returns a one-line summary."""
    from deltafm.images import write_meta
    from deltafm.sample_store import write_npz

    n = store.num
    ids = request.ids(n).numpy()
    extra = {"prompt_ids": (np.int64, (n,), [ids])} if request.kind == "text" else {
        "condition_ids": (np.int64, (n,), [ids]),
        **{f"cond.{k}": (np.int64, (n,), [part.ids.numpy()[ids]]) for k, part in request.table.parts.items()}}
    info = dict(meta, num=n, **request.meta(meta["cfg"]))
    what = f"{request.count} {'prompt' if request.kind == 'text' else 'condition group'}(s)"
    if not images:
        write_npz(out / "latents.npz", {"arr_0": (np.float32, (n, *store.item_shape), store.parts()), **extra})
        write_meta(out / "sample.json", info)
        return f"wrote {n} latents of {what} to {out / 'latents.npz'} (decode them with the VAE used to encode)"
    from deltafm.data.shapes_grid import save_captioned_grid

    shown = np.arange(min(n, GRID_MAX))
    chw = np.ascontiguousarray(store.take(shown).transpose(0, 3, 1, 2))
    titles = [request.titles[int(k)] for k in ids[shown]]
    save_captioned_grid(chw, titles, out / "grid.png", ncols=request.count if request.count <= 8 else 8)
    write_npz(out / "samples.npz", {"arr_0": (np.uint8, (n, *store.item_shape), store.parts()), **extra})
    write_meta(out / "sample.json", info)
    return f"wrote {n} samples of {what}: {out / 'grid.png'}, {out / 'samples.npz'}"
