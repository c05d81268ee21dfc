"""The coloured-shapes set (deltafm.data.shapes): determinism, true captions (checked by an independent parser
against the rendered pixels and the ground truth), geometry, colours, held-out pairs, the numeric encoding,
the single-object view and bad input."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deltafm.data import DataError, ImageDataset
from deltafm.data.shapes import (
    ALL_COLOURS,
    CELLS,
    COLOURS,
    PALETTE,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesConfig,
    decode_scenes,
    encode_scenes,
    generate_shapes,
    generate_single_objects,
    sample_scene,
)
from deltafm.data.shapes_render import render_objects

CFG = ShapesConfig()

# --------------------------------------------------------------------------------------------------------------
# An independent caption parser: words -> claims. Written from the English, not from the generator's code.

NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
NOUNS = {"circle": "circle", "circles": "circle", "square": "square", "squares": "square", "triangle": "triangle",
         "triangles": "triangle", "diamond": "diamond", "diamonds": "diamond", "cross": "cross", "crosses": "cross"}
#: position phrase -> (row, col) of the 3 x 3 grid
PLACES = {"in the top left corner": (0, 0), "in the top left": (0, 0), "at the top": (0, 1),
          "in the top right corner": (0, 2), "in the top right": (0, 2), "on the left": (1, 0),
          "in the centre": (1, 1), "in the middle": (1, 1), "on the right": (1, 2),
          "in the bottom left corner": (2, 0), "in the bottom left": (2, 0), "at the bottom": (2, 1),
          "in the bottom right corner": (2, 2), "in the bottom right": (2, 2)}
#: relation phrase -> (axis, sign): "A left of B" means A lies before B along x
RELS = {"to the left of": ("x", 1), "left of": ("x", 1), "to the right of": ("x", -1), "right of": ("x", -1),
        "above": ("y", 1), "below": ("y", -1), "beneath": ("y", -1)}

_alt = "|".join(sorted(map(re.escape, PLACES), key=len, reverse=True))
NP = (rf"(?P<det{{0}}>{'|'.join(NUMBERS)}) (?:(?P<size{{0}}>small|large) )?(?:(?P<colour{{0}}>"
      rf"{'|'.join(ALL_COLOURS)}) )?(?P<noun{{0}}>{'|'.join(NOUNS)})(?: (?P<place{{0}}>{_alt}))?")
NP_RE = re.compile(NP.format(""))
REL_RE = re.compile(NP.format("a") + " (?P<rel>" + "|".join(sorted(RELS, key=len, reverse=True)) + ") "
                    + NP.format("b"))


@dataclass
class Claim:
    count: int
    shape: str
    colour: str | None
    size: str | None
    place: tuple[int, int] | None


def _claim(m: re.Match, tag: str = "") -> Claim:
    det, noun = m[f"det{tag}"], m[f"noun{tag}"]
    count = NUMBERS[det]
    first = (m[f"size{tag}"] or m[f"colour{tag}"] or noun)
    assert (noun.endswith("s") and noun not in ("cross",)) == (count > 1), f"number agreement: {m[0]!r}"
    if det in ("a", "an"):
        assert (det == "an") == (first[0] in "aeiou"), f"article: {m[0]!r}"
    if count > 1:
        assert m[f"place{tag}"] is None, "a group has no single position"
    place = PLACES[m[f"place{tag}"]] if m[f"place{tag}"] else None
    return Claim(count, NOUNS[noun], m[f"colour{tag}"], m[f"size{tag}"], place)


def parse_caption(text: str) -> tuple[int | None, list[Claim], list[tuple[int, str, int, int]]]:
    """-> (stated total or None, noun-phrase claims, relations (claim a, axis, sign, claim b))."""
    body = re.sub(r"^(an image of |a picture of |a drawing of )", "", text)
    body = re.sub(r" on a black background$", "", body)
    total = None
    if m := re.fullmatch(r"(\w+) (?:shapes|objects): (.*)", body):
        total, body = NUMBERS[m[1]], m[2]
    claims, relations = [], []
    for chunk in re.split(r", and |, | and ", body):
        if m := REL_RE.fullmatch(chunk):
            a, b = _claim(m, "a"), _claim(m, "b")
            assert a.count == b.count == 1 and a.place is None and b.place is None, chunk
            claims += [a, b]
            relations.append((len(claims) - 2, *RELS[m["rel"]], len(claims) - 1))
        else:
            m = NP_RE.fullmatch(chunk)
            assert m is not None, f"cannot parse {chunk!r} in {text!r}"
            claims.append(_claim(m))
    return total, claims, relations


# --------------------------------------------------------------------------------------------------------------
# Facts measured on the pixels of each object drawn alone.

def colour_name(rgb: np.ndarray) -> str:
    """Name of a saturated colour from which channels are on (> 128)."""
    on = tuple(bool(v > 128) for v in rgb)
    return {(1, 0, 0): "red", (0, 1, 0): "green", (0, 0, 1): "blue", (1, 1, 0): "yellow", (1, 0, 1): "magenta",
            (0, 1, 1): "cyan", (1, 1, 1): "white"}[tuple(int(v) for v in on)]


@dataclass
class Seen:
    x0: int
    x1: int
    y0: int
    y1: int  # lit pixel extents, exclusive ends
    colour: str  # of the brightest pixel

    @property
    def cx(self) -> float:  # midpoint of the lit extent (the centroid would sit low for a triangle)
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2


def seen(obj: ShapeObject, config: ShapesConfig = CFG) -> tuple[Seen, np.ndarray]:
    img = render_objects([obj], config).astype(np.float64)
    lum = img.max(axis=0)
    ys, xs = np.nonzero(lum)
    w = lum[ys, xs]
    brightest = img[:, ys[np.argmax(w)], xs[np.argmax(w)]]
    s = Seen(int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1, colour_name(brightest))
    return s, lum > 0


def _fits(claim: Claim, obj: ShapeObject, s: Seen, config: ShapesConfig) -> bool:
    if claim.shape != obj.shape or claim.colour not in (None, s.colour) or claim.colour not in (None, obj.colour):
        return False
    if claim.size is not None and (claim.size != obj.size or s.x1 - s.x0 != config.size_px[SIZES.index(claim.size)]):
        return False
    if claim.place is not None:
        third = config.canvas / 3
        row, col = claim.place
        clear = all(abs(v - b) >= config.position_margin for v in obj.centre for b in (third, 2 * third))
        # a position is claimed only when clear; it names the cell of the centre and of the lit pixels' midpoint
        if not clear or (math.floor(s.cx / third), math.floor(s.cy / third)) != (col, row):
            return False
        if (math.floor(obj.centre[0] / third), math.floor(obj.centre[1] / third)) != (col, row):
            return False
    return True


def _related(a: Seen, axis: str, sign: int, b: Seen, config: ShapesConfig) -> bool:
    """A before B along the axis: all lit pixels of A before those of B, centres at least a small size apart."""
    first, second = (a, b) if sign > 0 else (b, a)
    if axis == "x":
        return first.x1 <= second.x0 and second.cx - first.cx >= config.size_px[0]
    return first.y1 <= second.y0 and second.cy - first.cy >= config.size_px[0]


def caption_is_true(caption: str, scene: Scene, config: ShapesConfig = CFG) -> bool:
    """Some one-to-one assignment of the scene's objects to the caption's mentions satisfies every claim."""
    total, claims, relations = parse_caption(caption)
    slots = [k for k, c in enumerate(claims) for _ in range(c.count)]
    if len(slots) != scene.count or total not in (None, scene.count):
        return False
    facts = [seen(o, config)[0] for o in scene.objects]
    for order in itertools.permutations(range(scene.count)):
        owner = {}  # claim -> object, for the single-object claims that relations refer to
        ok = True
        for slot, i in zip(slots, order):
            owner[slot] = i
            ok = ok and _fits(claims[slot], scene.objects[i], facts[i], config)
        ok = ok and all(_related(facts[owner[a]], axis, sign, facts[owner[b]], config)
                        for a, axis, sign, b in relations)
        if ok:
            return True
    return False


# --------------------------------------------------------------------------------------------------------------


def test_the_parser_rejects_false_and_incomplete_captions():
    red = ShapeObject("circle", "red", "small", (2, 2, 10, 10), 0)
    blue = ShapeObject("square", "blue", "large", (18, 18, 31, 31), 8)
    scene = Scene((red, blue))
    assert caption_is_true("a small red circle in the top left and a large blue square", scene)
    assert caption_is_true("a drawing of a red circle above a large blue square on a black background", scene)
    assert caption_is_true("two shapes: a blue square and a red circle", scene)
    assert not caption_is_true("a red circle", scene)  # one object left out
    assert not caption_is_true("a red circle below a blue square", scene)
    assert not caption_is_true("a large red circle and a blue square", scene)
    assert not caption_is_true("a red circle and a blue square in the centre", scene)
    assert not caption_is_true("three shapes: a red circle and a blue square", scene)
    assert not caption_is_true("two red circles", scene)
    with pytest.raises(AssertionError, match="article"):
        parse_caption("an red circle")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_are_true_of_the_images(split):
    n = 2000 if split == "train" else 300
    data = generate_shapes(n, seed=3, split=split)
    false = [(c, s) for c, s in zip(data.captions, data.scenes) if not caption_is_true(c, s)]
    assert false == []
    if split == "train":  # every kind of claim occurs, so the check above checks each of them
        parsed = [parse_caption(c) for c in data.captions]
        claims = [c for _, cs, _ in parsed for c in cs]
        assert {c.count for c in claims} == {1, 2, 3}
        assert all(any(getattr(c, f) is None for c in claims) and any(getattr(c, f) for c in claims)
                   for f in ("colour", "size", "place"))
        assert {p for c in claims if c.place for p in [c.place]} == set(itertools.product(range(3), range(3)))
        assert {(axis, sign) for _, _, rels in parsed for _, axis, sign, _ in rels} == set(
            itertools.product("xy", (1, -1)))
        assert {t for t, _, _ in parsed} == {None, 2, 3}
        assert len(set(data.captions)) > 0.9 * n


def test_single_object_captions_are_true():
    data = generate_single_objects(300, seed=4, split="all")
    assert all(caption_is_true(c, Scene((o,))) for c, o in zip(data.captions, data.objects))


def test_items_depend_only_on_seed_split_and_index():
    a, b = generate_shapes(40, seed=5), generate_shapes(40, seed=5)
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions and a.scenes == b.scenes
    part = generate_shapes(7, seed=5, start=30)
    assert part.images.tobytes() == a.images[30:37].tobytes() and part.scenes == a.scenes[30:37]
    assert part.captions == a.captions[30:37]
    assert sample_scene(33, seed=5) == (a.scenes[33], a.captions[33])
    assert generate_shapes(40, seed=6).images.tobytes() != a.images.tobytes()
    assert generate_shapes(40, seed=5, split="all").scenes != a.scenes
    s1, s2 = generate_single_objects(20, seed=5), generate_single_objects(5, seed=5, start=15)
    assert s2.images.tobytes() == s1.images[15:].tobytes() and s2.objects == s1.objects[15:]
    assert all(np.array_equal(s2.labels[k], s1.labels[k][15:]) for k in s1.labels)
    assert a.images.shape == (40, 3, 32, 32) and a.images.dtype == np.uint8


@pytest.mark.parametrize("canvas", [32, 64])
def test_objects_do_not_overlap_and_sit_where_the_ground_truth_says(canvas):
    config = ShapesConfig(canvas=canvas)
    data = generate_shapes(300, seed=7, split="all", config=config)
    assert {s.count for s in data.scenes} == {1, 2, 3}
    for img, scene in zip(data.images, data.scenes):
        alone = [render_objects([o], config) for o in scene.objects]
        masks = [seen(o, config)[1] for o in scene.objects]
        assert np.array_equal(sum(a.astype(np.int64) for a in alone), img)  # nothing overlaps or blends
        assert all(not (m1 & m2).any() for m1, m2 in itertools.combinations(masks, 2))
        for o in scene.objects:
            s, _ = seen(o, config)
            x0, y0, x1, y1 = o.bbox
            assert (s.x0, s.y0, s.x1, s.y1) == o.bbox  # every outline touches the four sides of its box
            assert x1 - x0 == y1 - y0 == config.size_px[SIZES.index(o.size)]
            assert min(x0, y0) >= config.border_px and max(x1, y1) <= canvas - config.border_px
            assert o.centre == ((x0 + x1) / 2, (y0 + y1) / 2)
            assert o.cell == 3 * min(2, int(3 * o.centre[1] // canvas)) + min(2, int(3 * o.centre[0] // canvas))
        for p, q in itertools.combinations(scene.objects, 2):  # at least gap_px apart along x or y
            dx = max(p.bbox[0] - q.bbox[2], q.bbox[0] - p.bbox[2])
            dy = max(p.bbox[1] - q.bbox[3], q.bbox[1] - p.bbox[3])
            assert max(dx, dy) >= config.gap_px


def test_object_pixels_have_their_palette_colour():
    config = ShapesConfig()
    assert config.colours == ALL_COLOURS
    data = generate_shapes(300, seed=8, split="all", config=config)
    palette = np.asarray([PALETTE[c] for c in ALL_COLOURS], dtype=np.float64)
    for scene in data.scenes:
        for o in scene.objects:
            img = render_objects([o], config).astype(np.float64)
            lit = img.max(axis=0) > 0
            mean = img[:, lit].mean(axis=1)
            assert ALL_COLOURS[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))] == o.colour
            full = img[:, lit].max(axis=1)  # fully covered pixels hold the palette colour exactly
            assert tuple(full) == PALETTE[o.colour]
    assert {o.colour for s in data.scenes for o in s.objects} == set(ALL_COLOURS)


def test_shapes_are_drawn_with_their_symmetries():
    for size, shape in itertools.product(SIZES, SHAPES):
        e = CFG.size_px[SIZES.index(size)]
        a = render_objects([ShapeObject(shape, "white", size, (1, 1, 1 + e, 1 + e), 0)], CFG)[0, 1:1 + e, 1:1 + e]
        assert np.array_equal(a, a[:, ::-1]), (shape, size)  # all are mirror-symmetric left-right
        assert np.array_equal(a, a[::-1]) == (shape != "triangle"), (shape, size)
        assert np.array_equal(a, a.T) == (shape != "triangle"), (shape, size)
        assert (a == 245).all() == (shape == "square")
    masks = {s: render_objects([ShapeObject(s, "white", "small", (1, 1, 9, 9), 0)], CFG).tobytes() for s in SHAPES}
    assert len(set(masks.values())) == len(SHAPES)


def test_heldout_pairs_split_the_data():
    pairs = set(CFG.heldout_pairs)
    assert len(pairs) == round(0.17 * len(SHAPES) * len(COLOURS)) == 6
    assert CFG.heldout_pairs == ShapesConfig().heldout_pairs != ShapesConfig(heldout_seed=1).heldout_pairs
    assert {s for s, _ in CFG.train_pairs} == set(SHAPES) and {c for _, c in CFG.train_pairs} == set(COLOURS)
    train = generate_shapes(1000, seed=9, split="train")
    held = generate_shapes(300, seed=9, split="heldout")
    seen_pairs = [{(o.shape, o.colour) for o in s.objects} for s in train.scenes]
    assert not any(p & pairs for p in seen_pairs)
    assert set().union(*seen_pairs) == set(CFG.train_pairs)
    assert all({(o.shape, o.colour) for o in s.objects} & pairs for s in held.scenes)
    assert {(o.shape, o.colour) for s in held.scenes for o in s.objects} >= pairs
    single = generate_single_objects(500, seed=9, split="train")
    assert not {(o.shape, o.colour) for o in single.objects} & pairs
    single_held = generate_single_objects(100, seed=9, split="heldout")
    assert {(o.shape, o.colour) for o in single_held.objects} == pairs


def test_numeric_encoding_round_trips_through_npz_and_safetensors(tmp_path):
    data = generate_shapes(200, seed=10, split="all")
    enc = data.encode()
    assert enc["shape"].shape == (200, 3) and enc["bbox"].shape == (200, 3, 4) and enc["count"].dtype == np.int16
    first = data.scenes[0].objects[0]
    assert CFG.vocab("colour")[enc["colour"][0, 0]] == first.colour and CELLS[enc["cell"][0, 0]] == first.cell_name
    for k, scene in enumerate(data.scenes):
        assert enc["count"][k] == scene.count
        assert all((enc[f][k, scene.count:] == -1).all() and (enc[f][k, :scene.count] >= 0).all()
                   for f in ("shape", "colour", "size", "cell", "bbox"))
    np.savez(tmp_path / "gt.npz", **enc)
    save_file(enc, str(tmp_path / "gt.safetensors"))
    with np.load(tmp_path / "gt.npz") as f:
        assert decode_scenes(dict(f), CFG) == data.scenes
    assert decode_scenes(load_file(str(tmp_path / "gt.safetensors")), CFG) == data.scenes
    bad = {k: v.copy() for k, v in enc.items()}
    bad["shape"][0, 0] = len(SHAPES)
    with pytest.raises(DataError, match="outside the vocabularies"):
        decode_scenes(bad, CFG)
    bad = {k: v.copy() for k, v in enc.items()}
    bad["count"][0] = 0
    with pytest.raises(DataError, match="padding"):
        decode_scenes(bad, CFG)
    with pytest.raises(DataError, match="lack bbox"):
        decode_scenes({k: v for k, v in enc.items() if k != "bbox"}, CFG)
    with pytest.raises(DataError, match="more than max_objects"):
        encode_scenes(data.scenes, ShapesConfig(max_objects=2))
    with pytest.raises(DataError, match="'red' is not in the vocabularies"):
        encode_scenes([Scene((ShapeObject("circle", "red", "small", (1, 1, 9, 9), 0),))],
                      ShapesConfig(colours=("green", "blue")))


def test_single_objects_carry_labels_and_make_a_class_conditional_dataset():
    data = generate_single_objects(900, seed=11, split="all")
    for k, o in enumerate(data.objects):
        assert [data.labels[f][k] for f in ("shape", "colour", "size", "cell")] == [
            SHAPES.index(o.shape), COLOURS.index(o.colour), SIZES.index(o.size), o.cell]
        assert all(abs(v - b) >= CFG.position_margin for v in o.centre for b in (32 / 3, 64 / 3))
    assert [len(np.unique(data.labels[f])) for f in ("shape", "colour", "size", "cell")] == [5, 7, 2, 9]
    ids, names = data.class_ids(("colour", "shape"))
    assert len(names) == 35 and names[0] == "red circle" and names[1] == "red square" and names[5] == "green circle"
    assert [names[i] for i in ids[:20]] == [f"{o.colour} {o.shape}" for o in data.objects[:20]]
    ds = data.dataset(("shape",))
    assert isinstance(ds, ImageDataset) and ds.num_classes == 5 and ds.class_names == SHAPES
    assert ds.images.shape == (900, 3, 32, 32) and ds.labels.tolist() == data.labels["shape"].tolist()
    with pytest.raises(DataError, match="unknown factor"):
        data.class_ids(("hue",))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"colours": ("red", "mauve")}, "unknown colour 'mauve'"),
    ({"shapes": ("circle", "star")}, "unknown shape 'star'"),
    ({"shapes": ("circle", "circle")}, "distinct"),
    ({"max_objects": 0}, "max_objects"),
    ({"max_objects": 5}, "canvas 32 too small for 5 objects"),
    ({"canvas": 8}, "canvas must be"),
    ({"canvas": 32, "size_px": (10, 20)}, "too small"),
    ({"size_px": (9, 9)}, "size_px"),
    ({"supersample": 1}, "supersample"),
    ({"heldout_fraction": 1.0}, "heldout_fraction"),
    ({"shapes": ("circle", "square"), "colours": ("red", "blue"), "heldout_fraction": 0.75}, "train split"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        ShapesConfig(**kwargs)


def test_bad_calls_are_refused():
    with pytest.raises(DataError, match="unknown split"):
        generate_shapes(2, split="test")
    with pytest.raises(DataError, match="heldout split is empty"):
        generate_shapes(2, split="heldout", config=ShapesConfig(heldout_fraction=0))
    with pytest.raises(DataError, match="seed"):
        generate_single_objects(2, seed=-1)
    with pytest.raises(DataError, match="n and start"):
        generate_shapes(-1)
    assert isinstance(DataError("x"), ValueError)


def test_captioned_grid_is_written(tmp_path):
    from PIL import Image

    from deltafm.data.shapes_grid import save_captioned_grid

    data = generate_shapes(6, seed=12)
    save_captioned_grid(data.images, data.captions, tmp_path / "grid.png", ncols=3, cell_inches=1.5, dpi=100)
    with Image.open(tmp_path / "grid.png") as img:
        assert img.format == "PNG" and img.width == 3 * 150
    with pytest.raises(ValueError, match="one caption per image"):
        save_captioned_grid(data.images, data.captions[:2], tmp_path / "x.png")
