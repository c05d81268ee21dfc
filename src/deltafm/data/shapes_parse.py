"""Read a coloured-shapes caption back into claims and check them against a scene (GenEval-like scoring).

The parser is written from the English of the captions (docs/SHAPES.md), not from the generator's code: its
own word tables, regular expressions and agreement checks, so a generator bug is not copied into the check.

A caption is ``[an image of |a picture of |a drawing of ][N shapes: |N objects: ]chunk{, |, and | and }chunk
[ on a black background]``; a chunk is a noun phrase ``det [size] [colour] shape[s] [position]`` (det: a, an,
one … nine) or a relation ``NP rel NP`` between two single objects without positions (rel: (to the) left of,
(to the) right of, above, below, beneath). Articles must agree ("an" before a vowel), the noun's number must
agree with the determiner, and a group (count ≥ 2) has no position.

Claims. Each mentioned object is a *slot* 0 … n − 1 (a noun phrase of count k gives k slots). The caption
yields atomic :class:`Claim` s of six kinds (:data:`CLAIM_KINDS`):

* ``shape`` (one per slot: the shape is always named), ``colour``, ``size``, ``cell`` (when named): the object
  assigned to the slot exists and has that shape / colour / size / 3 × 3 cell of its centre;
* ``relation`` (slot a, rel, slot b): both objects exist and A's box ends before B's starts along the axis
  (``left of``: A.x1 ≤ B.x0; ``right of``: B.x1 ≤ A.x0; ``above``: A.y1 ≤ B.y0; ``below``: B.y1 ≤ A.y0);
* ``count``: the scene holds exactly n objects (every caption mentions every object); a stated total
  ("three shapes: …") that differs from n adds a second count claim, so such a caption can never hold.

:func:`match_claims` finds an injective assignment of the scene's objects to the slots (as many slots filled
as there are objects) that satisfies the most claims, the first such in enumeration order; the caption holds
when that assignment satisfies all of them. Per-claim truth values come from that same best assignment, so
``per_claim`` counts what a generated image got right under its most favourable reading.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from deltafm.data.datasets import DataError
from deltafm.data.shapes_config import CELLS, SIZES, Scene, ShapeObject, ShapesConfig

__all__ = ["CLAIM_KINDS", "Claim", "check_claims", "claims_by_attribute", "evaluate_claims", "match_claims",
           "num_slots", "parse_caption"]

#: the kinds of claim, in the order scores report them
CLAIM_KINDS: tuple[str, ...] = ("shape", "colour", "size", "cell", "count", "relation")

_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8, "nine": 9}
#: position phrase -> cell id 3 row + col
_PLACES = {"in the top left corner": 0, "in the top left": 0, "at the top": 1, "in the top right corner": 2,
           "in the top right": 2, "on the left": 3, "in the centre": 4, "in the middle": 4, "on the right": 5,
           "in the bottom left corner": 6, "in the bottom left": 6, "at the bottom": 7,
           "in the bottom right corner": 8, "in the bottom right": 8}
#: relation phrase -> relation name
_RELS = {"to the left of": "left of", "left of": "left of", "to the right of": "right of",
         "right of": "right of", "above": "above", "below": "below", "beneath": "below"}
_PREFIX = re.compile(r"^(?:an image of |a picture of |a drawing of )")
_SUFFIX = re.compile(r" on a black background$")
_TOTAL = re.compile(r"(\w+) (?:shapes|objects): (.*)")
_SPLIT = re.compile(r", and |, | and ")


@dataclass(frozen=True)
class Claim:
    """One checkable statement of a caption (module docstring).

    Attributes:
        kind: one of :data:`CLAIM_KINDS`.
        value: shape, colour or size name; cell id (0 … 8); relation name (``left of`` …); count.
        slot: the object slot the claim is about (−1 for ``count``); for ``relation`` the first object.
        other: the second object slot of a ``relation`` (−1 otherwise).
        mention: the noun phrase (0, 1, … in the caption's order) of a slot claim (−1 otherwise); a phrase of
            count k ("two red circles") gives each of its k slots the same claims and mention.
    """

    kind: str
    value: str | int
    slot: int = -1
    other: int = -1
    mention: int = -1

    def __str__(self) -> str:
        if self.kind == "count":
            return f"exactly {self.value} objects"
        if self.kind == "relation":
            return f"object {self.slot} {self.value} object {self.other}"
        shown = CELLS[self.value] if self.kind == "cell" else self.value
        return f"object {self.slot} {self.kind} {shown}"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


@lru_cache(maxsize=16)
def _grammar(shapes: tuple[str, ...], colours: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern, dict[str, str]]:
    """Regular expressions of a noun phrase and of a relation chunk over the vocabularies, and noun -> shape."""
    nouns = {s: s for s in shapes} | {_plural(s): s for s in shapes}

    def alt(words) -> str:
        return "|".join(sorted(map(re.escape, words), key=len, reverse=True))

    np_ = (rf"(?P<det{{0}}>{alt(_NUMBERS)}) (?:(?P<size{{0}}>{alt(SIZES)}) )?(?:(?P<colour{{0}}>{alt(colours)}) )?"
           rf"(?P<noun{{0}}>{alt(nouns)})(?: (?P<place{{0}}>{alt(_PLACES)}))?")
    rel = re.compile(np_.format("a") + f" (?P<rel>{alt(_RELS)}) " + np_.format("b"))
    return re.compile(np_.format("")), rel, nouns


def _mention(m: re.Match, nouns: dict[str, str], tag: str, text: str) -> tuple[int, str, str | None, str | None,
                                                                                int | None]:
    """(count, shape, colour, size, cell) of a noun-phrase match, after the agreement checks."""
    det, noun, place = m[f"det{tag}"], m[f"noun{tag}"], m[f"place{tag}"]
    count, shape = _NUMBERS[det], nouns[noun]
    if (noun != shape) != (count > 1):
        raise DataError(f"number agreement: {det!r} with {noun!r} in caption {text!r}")
    first = m[f"size{tag}"] or m[f"colour{tag}"] or noun
    if det in ("a", "an") and (det == "an") != (first[0] in "aeiou"):
        raise DataError(f"article: {det!r} before {first!r} in caption {text!r}")
    if count > 1 and place is not None:
        raise DataError(f"a group of {count} has no single position: {m[0]!r} in caption {text!r}")
    return count, shape, m[f"colour{tag}"], m[f"size{tag}"], _PLACES[place] if place else None


def _object_claims(mention: tuple, first_slot: int, index: int) -> list[Claim]:
    count, shape, colour, size, cell = mention
    out = []
    for slot in range(first_slot, first_slot + count):
        out.append(Claim("shape", shape, slot, mention=index))
        out += [Claim(kind, v, slot, mention=index) for kind, v in (("colour", colour), ("size", size),
                                                                     ("cell", cell)) if v is not None]
    return out


def parse_caption(caption: str, config: ShapesConfig | None = None) -> list[Claim]:
    """The claims of ``caption`` (module docstring) over the vocabularies of ``config`` (default: all).

    Raises:
        DataError: a chunk that is not a noun phrase or relation over the vocabularies, an article or number
            that does not agree, a position on a group, a relation between groups or positioned objects.
    """
    config = config or ShapesConfig()
    np_re, rel_re, nouns = _grammar(config.shapes, config.colours)
    body = _SUFFIX.sub("", _PREFIX.sub("", caption.strip()))
    stated = None
    if (m := _TOTAL.fullmatch(body)) and m[1] in _NUMBERS and m[1] not in ("a", "an"):
        stated, body = _NUMBERS[m[1]], m[2]
    claims: list[Claim] = []
    slots = mentions = 0
    for chunk in _SPLIT.split(body):
        if m := rel_re.fullmatch(chunk):
            a, b = _mention(m, nouns, "a", caption), _mention(m, nouns, "b", caption)
            if a[0] != 1 or b[0] != 1 or a[4] is not None or b[4] is not None:
                raise DataError(f"a relation joins two single objects without positions: {chunk!r} in {caption!r}")
            claims += _object_claims(a, slots, mentions) + _object_claims(b, slots + 1, mentions + 1)
            claims.append(Claim("relation", _RELS[m["rel"]], slots, slots + 1))
            slots, mentions = slots + 2, mentions + 2
        elif m := np_re.fullmatch(chunk):
            mention = _mention(m, nouns, "", caption)
            claims += _object_claims(mention, slots, mentions)
            slots, mentions = slots + mention[0], mentions + 1
        else:
            raise DataError(f"cannot parse {chunk!r} in caption {caption!r} (vocabularies: "
                            f"{', '.join(config.shapes)}; {', '.join(config.colours)})")
    claims.append(Claim("count", slots))
    if stated is not None and stated != slots:
        claims.append(Claim("count", stated))
    return claims


def _holds(claim: Claim, a: ShapeObject | None, b: ShapeObject | None, clear: ShapesConfig | None) -> bool:
    """Truth of a slot or relation claim for the objects assigned to its slot(s) (None: no object)."""
    if a is None or (claim.kind == "relation" and b is None):
        return False
    if claim.kind == "shape":
        return a.shape == claim.value
    if claim.kind == "colour":
        return a.colour == claim.value
    if claim.kind == "size":
        return a.size == claim.value
    if claim.kind == "cell":
        return a.cell == claim.value and (clear is None or clear.clear_cell(a))
    if claim.kind == "relation":
        rel = claim.value
        return {"left of": a.left_of(b), "right of": b.left_of(a), "above": a.above(b),
                "below": b.above(a)}[rel]
    raise DataError(f"unknown claim kind {claim.kind!r}; known: {', '.join(CLAIM_KINDS)}")


def num_slots(claims: Sequence[Claim]) -> int:
    """Number of object slots the claims refer to: 1 + the largest slot (0 without slot claims)."""
    return 1 + max((max(c.slot, c.other) for c in claims), default=-1)


def evaluate_claims(claims: Sequence[Claim], scene: Scene, assignment: Sequence[int | None],
                    clear: ShapesConfig | None = None) -> list[bool]:
    """Truth of each claim when slot k is scene object ``assignment[k]`` (None: no object).

    ``clear``: also require a claimed cell to be clear of the cell boundaries by ``clear.position_margin``
    (the rule by which the generator names positions); None (scoring) takes the cell of the centre as is.
    """
    objs = [None if i is None else scene.objects[i] for i in assignment]
    out = []
    for c in claims:
        if c.kind == "count":
            out.append(scene.count == c.value)
        else:
            out.append(_holds(c, objs[c.slot], objs[c.other] if c.other >= 0 else None, clear))
    return out


def _assignments(n_slots: int, n_objects: int):
    """Injective maps slot -> object that fill min(n_slots, n_objects) slots, in a fixed order."""
    if n_objects >= n_slots:
        yield from itertools.permutations(range(n_objects), n_slots)
        return
    for filled in itertools.combinations(range(n_slots), n_objects):
        for order in itertools.permutations(range(n_objects)):
            out: list[int | None] = [None] * n_slots
            for slot, obj in zip(filled, order):
                out[slot] = obj
            yield tuple(out)


def match_claims(claims: Sequence[Claim], scene: Scene,
                 clear: ShapesConfig | None = None) -> tuple[tuple[int | None, ...], list[bool]]:
    """The assignment of scene objects to slots that satisfies the most claims (the first in enumeration
    order among ties) and the per-claim truth under it. Enumerates n!/(n−k)! maps (3 objects: at most 6)."""
    best: tuple[tuple[int | None, ...], list[bool]] | None = None
    for assignment in _assignments(num_slots(claims), scene.count):
        truth = evaluate_claims(claims, scene, assignment, clear)
        if best is None or sum(truth) > sum(best[1]):
            best = (assignment, truth)
            if all(truth):
                break
    assert best is not None  # there is always at least the empty assignment
    return best


def check_claims(claims: Sequence[Claim], scene: Scene,
                 clear: ShapesConfig | None = None) -> tuple[bool, list[bool]]:
    """(whether one assignment satisfies every claim, per-claim truth under the best assignment)."""
    _, truth = match_claims(claims, scene, clear)
    return all(truth), truth


def claims_by_attribute(claims: Sequence[Claim], per_claim: Sequence[bool]) -> dict[str, tuple[int, int]]:
    """kind -> (claims of that kind that hold, claims of that kind), for every kind of :data:`CLAIM_KINDS`."""
    if len(claims) != len(per_claim):
        raise DataError(f"{len(per_claim)} truth values for {len(claims)} claims")
    out = {k: [0, 0] for k in CLAIM_KINDS}
    for c, ok in zip(claims, per_claim):
        out[c.kind][0] += bool(ok)
        out[c.kind][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}
