"""Captions of coloured-shapes scenes, built from the ground truth with templates drawn from the scene's rng.

Every caption mentions every object exactly once (the counts of its noun phrases add up to the number of
objects) and claims only what holds:

* a noun phrase is ``[a|an|one|two|three|…] [size] [colour] shape[s] [position]``; the shape is always named,
  a colour only when all its objects have it, a size only when all its objects have it, a position (a cell
  phrase such as "in the top left", "at the bottom", "in the centre") only for a single object whose centre
  is at least ``position_margin`` from the cell boundaries (:meth:`ShapesConfig.clear_cell`);
* a relation ``A left of B`` / ``right of`` / ``above`` / ``below`` joins two single objects only when their
  boxes are apart along that axis (:meth:`ShapeObject.left_of`, :meth:`ShapeObject.above`);
* ``N shapes:`` / ``N objects:`` before a list states the number of objects.

Templates (probabilities for one object / for more): ``list`` of noun phrases, objects of one shape and
colour counted together ("two red circles and a small blue square"; 0.9 / 0.35); ``numbered`` list ("three
shapes: a red circle, a cyan cross and a green triangle"; – / 0.15); ``relation`` ("a small red circle to the
left of a blue square", the other objects listed after ", and"; – / 0.4); ``colourless`` list, grouped by
shape ("three squares"; 0.1 / 0.1). Each may be wrapped as "an image of …", "a picture of …", "a drawing
of …" and end in " on a black background".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deltafm.data.shapes_config import ShapeObject, ShapesConfig

__all__ = ["CELL_PHRASES", "NUMBER_WORDS", "PLURALS", "RELATION_PHRASES", "TEMPLATES", "caption_objects"]

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           "diamond": "diamonds", "cross": "crosses"}
#: phrasings of each position cell (ids as in :data:`~deltafm.data.shapes_config.CELLS`)
CELL_PHRASES: tuple[tuple[str, ...], ...] = (
    ("in the top left", "in the top left corner"), ("at the top",), ("in the top right", "in the top right corner"),
    ("on the left",), ("in the centre", "in the middle"), ("on the right",),
    ("in the bottom left", "in the bottom left corner"), ("at the bottom",),
    ("in the bottom right", "in the bottom right corner"),
)
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
    "above": ("above",), "below": ("below", "beneath"),
}
TEMPLATES: tuple[str, ...] = ("list", "numbered", "relation", "colourless")
_WEIGHTS = {1: (0.9, 0.0, 0.0, 0.1), 2: (0.35, 0.15, 0.4, 0.1)}
_PREFIXES = ("", "", "", "an image of ", "a picture of ", "a drawing of ")
_SUFFIXES = ("", "", "", " on a black background")
_SIZE_P, _POSITION_P = 0.5, 0.35


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(group: Sequence[ShapeObject], config: ShapesConfig, rng: np.random.Generator, colour: bool,
            size: bool | None = None, position: bool = True) -> str:
    """A noun phrase for the objects of ``group`` (one shape; one colour when ``colour``). ``size``: True
    names the (common) size, None names it with probability 1/2 when all share it."""
    first = group[0]
    same_size = all(o.size == first.size for o in group)
    words = []
    if size or (size is None and same_size and rng.random() < _SIZE_P):
        words.append(first.size)
    if colour:
        words.append(first.colour)
    words.append(first.shape if len(group) == 1 else PLURALS[first.shape])
    if len(group) == 1:
        det = "one" if rng.random() < 0.1 else _article(words[0])
    else:
        det = NUMBER_WORDS[len(group)]
    text = " ".join([det, *words])
    if len(group) == 1 and position and config.clear_cell(first) and rng.random() < _POSITION_P:
        text += " " + _pick(rng, CELL_PHRASES[first.cell])
    return text


def _join(parts: Sequence[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    last = ", and " if len(parts) > 2 and rng.random() < 0.5 else " and "
    return ", ".join(parts[:-1]) + last + parts[-1]


def _listing(objects: Sequence[ShapeObject], config: ShapesConfig, rng: np.random.Generator,
             colour: bool = True) -> list[str]:
    """Noun phrases of ``objects`` in a random order, grouped by shape and colour (by shape alone without
    ``colour``); with probability 0.3 (with colour) also by size, each phrase then naming the size."""
    by_size = colour and rng.random() < 0.3
    groups: dict[tuple[str, ...], list[ShapeObject]] = {}
    for obj in objects:
        key = (obj.shape, obj.colour if colour else "", obj.size if by_size else "")
        groups.setdefault(key, []).append(obj)
    ordered = list(groups.values())
    order = rng.permutation(len(ordered))
    return [_phrase(ordered[i], config, rng, colour, size=True if by_size else None) for i in order]


def _relations(a: ShapeObject, b: ShapeObject) -> list[str]:
    rel = []
    if a.left_of(b):
        rel.append("left of")
    if b.left_of(a):
        rel.append("right of")
    if a.above(b):
        rel.append("above")
    if b.above(a):
        rel.append("below")
    return rel


def _relation(objects: Sequence[ShapeObject], config: ShapesConfig, rng: np.random.Generator) -> str:
    """``A rel B`` for a random ordered pair with a relation, the other objects listed after ", and"."""
    pairs = [(i, j) for i in range(len(objects)) for j in range(len(objects))
             if i != j and _relations(objects[i], objects[j])]
    i, j = pairs[int(rng.integers(len(pairs)))]
    rel = _pick(rng, _relations(objects[i], objects[j]))
    a = _phrase([objects[i]], config, rng, colour=True, position=False)
    b = _phrase([objects[j]], config, rng, colour=True, position=False)
    text = f"{a} {_pick(rng, RELATION_PHRASES[rel])} {b}"
    rest = [o for k, o in enumerate(objects) if k not in (i, j)]
    if rest:
        text += ", and " + _join(_listing(rest, config, rng), rng)
    return text


def caption_objects(objects: Sequence[ShapeObject], config: ShapesConfig, rng: np.random.Generator) -> str:
    """A caption of the scene made of ``objects`` (module docstring), drawn with ``rng``."""
    if not objects:
        raise ValueError("a scene needs at least one object to caption")
    weights = np.asarray(_WEIGHTS[min(len(objects), 2)])
    template = TEMPLATES[int(rng.choice(len(TEMPLATES), p=weights / weights.sum()))]
    if template == "relation":
        body = _relation(objects, config, rng)
    elif template == "colourless":
        body = _join(_listing(objects, config, rng, colour=False), rng)
    else:
        body = _join(_listing(objects, config, rng), rng)
        if template == "numbered":
            body = f"{NUMBER_WORDS[len(objects)]} {_pick(rng, ('shapes', 'objects'))}: {body}"
    return _pick(rng, _PREFIXES) + body + _pick(rng, _SUFFIXES)
