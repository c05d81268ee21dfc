"""The coloured-shapes set (deltafm.data.shapes): determinism, true captions (checked by an independent parser
against the rendered pixels and the ground truth), geometry, colours, held-out pairs, the numeric encoding,
the single-object view and bad input."""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
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
    RELATIONS,
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
from deltafm.data.shapes_parse import check_claims, evaluate_claims, num_slots, parse_caption
from deltafm.data.shapes_render import render_objects

CFG = ShapesConfig()

# --------------------------------------------------------------------------------------------------------------
# Captions are read back with deltafm.data.shapes_parse: a parser written from the English, not from the
# generator's code (its own word tables and regular expressions). Its claims are checked here twice under one
# assignment of objects to mentions: against the ground truth and against facts measured on the pixels.

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


def measured(obj: ShapeObject, config: ShapesConfig = CFG) -> ShapeObject:
    """The object as its pixels show it: lit extent as box and size (an extent that is no size names none),
    cell of the lit pixels' midpoint, colour from which channels are lit; the shape from the ground truth."""
    s, _ = seen(obj, config)
    size = {e: name for name, e in zip(SIZES, config.size_px)}.get(s.x1 - s.x0, "no size")
    cell = 3 * math.floor(3 * s.cy / config.canvas) + math.floor(3 * s.cx / config.canvas)
    return ShapeObject(obj.shape, s.colour, size, (s.x0, s.y0, s.x1, s.y1), cell)


def _apart(a: ShapeObject, rel: str, b: ShapeObject, config: ShapesConfig) -> bool:
    """The centres are at least a small size apart along the relation's axis, in its direction."""
    (ax, ay), (bx, by) = a.centre, b.centre
    gap = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel]
    return gap >= config.size_px[0]


def _clear(obj: ShapeObject, config: ShapesConfig) -> bool:
    """The centre lies at least position_margin from the inner cell boundaries (the rule for naming a cell)."""
    third = config.canvas / 3
    return all(abs(v - b) >= config.position_margin for v in obj.centre for b in (third, 2 * third))


def caption_is_true(caption: str, scene: Scene, config: ShapesConfig = CFG) -> bool:
    """Some one-to-one assignment of the scene's objects to the caption's mentions satisfies every claim on the
    ground truth and on the measured objects alike, with named cells clear of the cell boundaries and the
    centres of related objects at least a small size apart. Also checks that check_claims agrees on the truth."""
    claims = parse_caption(caption, config)
    seen_scene = Scene(tuple(measured(o, config) for o in scene.objects))
    truth = found = False
    if num_slots(claims) == scene.count:
        for order in itertools.permutations(range(scene.count)):
            on_truth = all(evaluate_claims(claims, scene, order))
            truth = truth or on_truth
            objs = [seen_scene.objects[i] for i in order]
            if on_truth and all(evaluate_claims(claims, seen_scene, order)) and all(
                    _apart(objs[c.slot], c.value, objs[c.other], config) for c in claims if c.kind == "relation"
            ) and all(_clear(objs[c.slot], config) for c in claims if c.kind == "cell"):
                found = True
    assert check_claims(claims, scene)[0] == truth
    return found


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
    with pytest.raises(DataError, match="article"):
        parse_caption("an red circle", CFG)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_are_true_of_the_images(split):
    n = 2000 if split == "train" else 300
    data = generate_shapes(n, seed=3, split=split)
    false = [(c, s) for c, s in zip(data.captions, data.scenes) if not caption_is_true(c, s)]
    assert false == []
    if split == "train":  # every kind of claim occurs, so the check above checks each of them
        parsed = [parse_caption(c) for c in data.captions]
        groups = [Counter(c.mention for c in cs if c.kind == "shape") for cs in parsed]
        assert set().union(*(g.values() for g in groups)) == {1, 2, 3}
        kinds = [{c.kind for c in cs if c.slot == k and c.kind != "relation"} for cs in parsed
                 for k in range(num_slots(cs))]
        assert all(any(f in k for k in kinds) and any(f not in k for k in kinds) for f in ("colour", "size", "cell"))
        assert {c.value for cs in parsed for c in cs if c.kind == "cell"} == set(range(9))
        assert {c.value for cs in parsed for c in cs if c.kind == "relation"} == set(RELATIONS)
        numbered = [s.count for c, s in zip(data.captions, data.scenes) if re.search(r"(shapes|objects): ", c)]
        assert set(numbered) == {2, 3}
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
