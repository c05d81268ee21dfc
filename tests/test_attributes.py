"""The attribute reader and GenEval-like scoring on the coloured-shapes set: the caption parser and claim checker
on hand-made scenes, the scoring maths on hand-made read scenes, decoding, a tiny reader trained for a few
seconds (well above chance on held-out scenes), save/load, errors, determinism and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deltafm.data import DataError
from deltafm.data.shapes import Scene, ShapeObject, ShapesConfig, generate_shapes, generate_single_objects
from deltafm.data.shapes_parse import Claim, check_claims, claims_by_attribute, match_claims, parse_caption
from deltafm.eval.attributes import AttributeReader, ReaderConfig, decode, load_reader, save_reader, scene_targets
from deltafm.eval.attributes_cli import main
from deltafm.eval.attributes_score import (
    compare_scenes,
    reader_fd,
    scene_reference_statistics,
    score_prompts,
    score_scenes,
    score_single_objects,
)
from deltafm.eval.attributes_train import EVAL_SEED, ReaderRecipe, evaluate_reader, train_reader
from deltafm.eval.features import evaluate_samples
from deltafm.eval.metrics import EvalInputError

CFG = ShapesConfig()


def obj(shape: str, colour: str, size: str, x0: int, y0: int) -> ShapeObject:
    e = CFG.extent(size)
    return ShapeObject(shape, colour, size, (x0, y0, x0 + e, y0 + e),
                       3 * min(2, int(3 * (y0 + e / 2) // 32)) + min(2, int(3 * (x0 + e / 2) // 32)))


RED = obj("circle", "red", "small", 2, 2)  # centre (6, 6): top left
BLUE = obj("square", "blue", "large", 18, 18)  # centre (24.5, 24.5): bottom right
GREEN = obj("triangle", "green", "small", 12, 2)  # centre (16, 6): top; starts where RED ends + 2


# --------------------------------------------------------------------------------------------------------------
# parser and checker


def test_a_caption_becomes_atomic_claims():
    claims = parse_caption("a picture of a small red circle to the left of a large blue square, and two green "
                           "triangles on a black background", CFG)
    assert claims == [
        Claim("shape", "circle", 0, mention=0), Claim("colour", "red", 0, mention=0),
        Claim("size", "small", 0, mention=0),
        Claim("shape", "square", 1, mention=1), Claim("colour", "blue", 1, mention=1),
        Claim("size", "large", 1, mention=1),
        Claim("relation", "left of", 0, 1),
        Claim("shape", "triangle", 2, mention=2), Claim("colour", "green", 2, mention=2),
        Claim("shape", "triangle", 3, mention=2), Claim("colour", "green", 3, mention=2),
        Claim("count", 4),
    ]
    assert parse_caption("three objects: a cross in the centre, a circle and a square", CFG)[-1] == Claim("count", 3)
    assert parse_caption("an image of one cross in the middle", CFG) == [
        Claim("shape", "cross", 0, mention=0), Claim("cell", 4, 0, mention=0), Claim("count", 1)]
    wrong_total = parse_caption("three shapes: a red circle and a blue square", CFG)
    assert [c for c in wrong_total if c.kind == "count"] == [Claim("count", 2), Claim("count", 3)]


@pytest.mark.parametrize(("caption", "message"), [
    ("an red circle", "article"), ("a orange circle", "cannot parse"), ("a red circles", "number agreement"),
    ("two red circle", "number agreement"), ("two red circles in the top left", "no single position"),
    ("two circles above a square", "single objects"), ("a circle in the centre above a square", "single objects"),
    ("", "cannot parse"), ("a red star", "cannot parse"),
])
def test_bad_captions_are_refused_by_name(caption, message):
    with pytest.raises(DataError, match=message):
        parse_caption(caption, CFG)


def test_vocabularies_of_the_config_bound_the_parser():
    small = ShapesConfig(shapes=("circle", "square"), colours=("red", "blue"), heldout_fraction=0)
    assert parse_caption("a red square", small)
    with pytest.raises(DataError, match="cannot parse"):
        parse_caption("a green square", small)


def test_claims_hold_under_the_best_assignment_only_when_true():
    scene = Scene((BLUE, RED, GREEN))
    ok, truth = check_claims(parse_caption("a red circle left of a green triangle, and a large blue square", CFG),
                             scene)
    assert ok and all(truth)
    assignment, _ = match_claims(parse_caption("a blue square, a red circle and a green triangle", CFG), scene)
    assert assignment == (0, 1, 2)
    claims = parse_caption("a red circle to the right of a green triangle, and a small blue square in the top left",
                           CFG)
    ok, truth = check_claims(claims, scene)
    assert not ok
    wrong = {str(c) for c, t in zip(claims, truth) if not t}
    assert wrong == {"object 0 right of object 1", "object 2 size small", "object 2 cell top left"}
    assert claims_by_attribute(claims, truth) == {"shape": (3, 3), "colour": (3, 3), "size": (0, 1), "cell": (0, 1),
                                                  "count": (1, 1), "relation": (0, 1)}
    # RED and GREEN are apart along x but overlap along y: neither is above the other
    assert not check_claims(parse_caption("a red circle above a green triangle, and a square", CFG), scene)[0]
    assert check_claims(parse_caption("a circle above a square, and a triangle", CFG), scene)[0]


def test_touching_boxes_are_ordered_and_overlapping_ones_are_not():
    a, b = obj("circle", "red", "small", 2, 2), obj("square", "blue", "small", 10, 20)  # a.x1 == b.x0 == 10
    assert check_claims(parse_caption("a circle left of a square", CFG), Scene((a, b)))[0]
    c = obj("square", "blue", "small", 9, 20)  # one pixel of overlap along x
    assert not check_claims(parse_caption("a circle left of a square", CFG), Scene((a, c)))[0]
    assert check_claims(parse_caption("a circle above a square", CFG), Scene((a, c)))[0]


def test_counts_missing_and_extra_objects():
    three = Scene((RED, obj("circle", "red", "small", 2, 20), obj("circle", "red", "large", 17, 10)))
    claims = parse_caption("two red circles", CFG)
    ok, truth = check_claims(claims, three)
    assert not ok and truth == [True, True, True, True, False]  # both mentioned circles exist, the count is off
    one = Scene((RED,))
    ok, truth = check_claims(claims, one)
    assert truth == [True, True, False, False, False]  # the second slot has no object
    assert check_claims(parse_caption("three red circles", CFG), three)[0]
    assert not check_claims(parse_caption("a red circle", CFG), Scene(()))[0]


def test_a_named_cell_can_be_required_to_be_clear():
    edge = obj("circle", "red", "small", 7, 2)  # centre x 11, 0.33 px right of the boundary 10.67: cell "top"
    claims = parse_caption("a red circle at the top", CFG)
    assert check_claims(claims, Scene((edge,)))[0]
    assert not check_claims(claims, Scene((edge,)), clear=CFG)[0]  # the generator's margin is 1 px


# --------------------------------------------------------------------------------------------------------------
# scoring maths on hand-made read scenes


def test_prompt_scores_are_the_documented_fractions():
    captions = ["a red circle and a large blue square",  # 6 claims; read: the square is small -> 5/6
                "a red circle left of a green triangle",  # 6 claims, all hold
                "two red circles"]  # 5 claims; read: one red circle only -> shape, colour of slot 1 and count fail
    small_blue = obj("square", "blue", "small", 18, 18)
    read = [Scene((RED, small_blue)), Scene((GREEN, RED)), Scene((RED,))]
    out = score_scenes(read, [parse_caption(c, CFG) for c in captions], details=True)
    assert out["prompt_ok"] == [False, True, False]
    assert out["prompt_accuracy"] == pytest.approx(1 / 3)
    assert out["agreement"] == pytest.approx((5 / 6 + 1 + 2 / 5) / 3)
    assert out["num_claims"] == {"shape": 6, "colour": 6, "size": 1, "cell": 0, "count": 3, "relation": 1}
    assert out["per_attribute"] == {"shape": pytest.approx(5 / 6), "colour": pytest.approx(5 / 6), "size": 0.0,
                                    "cell": None, "count": pytest.approx(2 / 3), "relation": 1.0}
    assert out["prompt_accuracy_by_count"] == {2: pytest.approx(1 / 3)}


def test_reader_accuracy_against_ground_truth_is_counted_per_object_and_scene():
    moved = obj("circle", "red", "small", 3, 2)  # box off by one pixel, same cell
    wrong_colour = obj("square", "green", "large", 18, 18)
    true = [Scene((RED, BLUE)), Scene((GREEN,)), Scene((RED,))]
    read = [Scene((wrong_colour, moved)), Scene((GREEN,)), Scene((RED, GREEN))]
    out = compare_scenes(read, true, near=5)
    assert out["shape"] == 1.0 and out["colour"] == pytest.approx(3 / 4) and out["box"] == pytest.approx(3 / 4)
    assert out["recall"] == 1.0 and out["precision"] == pytest.approx(4 / 5)
    assert out["count"] == pytest.approx(2 / 3) and out["exact_scene"] == pytest.approx(1 / 3)
    far = Scene((obj("circle", "red", "small", 20, 2),))
    assert compare_scenes([far], [Scene((RED,))], near=5)["recall"] == 0.0


# --------------------------------------------------------------------------------------------------------------
# decoding and targets


def test_targets_and_decoding_invert_each_other_exactly():
    config = ReaderConfig()
    scenes = list(generate_shapes(64, seed=5, split="all").scenes)
    t = scene_targets(scenes, config)
    assert int(t["object"].sum()) == sum(s.count for s in scenes) and (t["offset"] < 1).all()
    big = 30.0  # logits that make the targets the predictions
    out = {"object": t["object"] * 2 * big - big, "offset": t["offset"]}
    for f, k in (("shape", 5), ("colour", 7), ("size", 2)):
        out[f] = torch.nn.functional.one_hot(t[f].clamp(min=0), k).permute(0, 3, 1, 2).float() * big
    read = decode(out, config)
    assert [sorted(s.objects, key=lambda o: o.bbox) for s in read] == [
        sorted(s.objects, key=lambda o: o.bbox) for s in scenes]
    out["object"][:] = -big
    assert [s.count for s in decode(out, config, top1=True)] == [1] * 64
    with pytest.raises(EvalInputError, match="two object centres"):
        scene_targets([Scene((RED, obj("circle", "red", "small", 3, 3)))], config)


def test_neighbouring_detections_of_one_object_are_merged_and_boxes_stay_on_the_canvas():
    config = ReaderConfig()
    out = {"object": torch.full((1, 8, 8), -9.0), "offset": torch.full((1, 2, 8, 8), 0.5),
           "shape": torch.zeros(1, 5, 8, 8), "colour": torch.zeros(1, 7, 8, 8), "size": torch.zeros(1, 2, 8, 8)}
    out["object"][0, 3, 3] = out["object"][0, 3, 4] = 5.0  # centres (14, 14) and (18, 14): 4 px apart
    out["object"][0, 0, 7] = 4.0  # centre (30, 2): a small box would leave the canvas
    read = decode(out, config)[0]
    assert [o.bbox for o in read.objects] == [(10, 10, 18, 18), (24, 0, 32, 8)]


# --------------------------------------------------------------------------------------------------------------
# a tiny trained reader


@pytest.fixture(scope="module")
def tiny() -> AttributeReader:
    recipe = ReaderRecipe(scenes=4096, epochs=1, batch_size=32, widths=(16, 24, 32), seed=0)
    return train_reader(recipe, progress=False, evaluate=0)


def test_a_tiny_reader_reads_held_out_scenes_well_above_chance(tiny):
    # chance: shape 1/5, colour 1/7, size 1/2, cell about 1/9 (a shuffled label mapping scores these); count
    # ~1/3. A few seconds of training already reads size, cell and count almost perfectly.
    acc = evaluate_reader(tiny, 300)
    for split in ("all", "heldout"):
        a = acc[split]
        assert a["shape"] > 0.45 and a["colour"] > 0.5, a
        assert a["size"] > 0.9 and a["cell"] > 0.9 and a["count"] > 0.9 and a["recall"] > 0.9, a
        assert a["seed"] == EVAL_SEED


def test_scores_of_real_images_and_single_objects(tiny):
    data = generate_shapes(200, seed=EVAL_SEED, split="all")
    out = score_prompts(tiny, data.images, data.captions, CFG, details=True)
    assert out == {**score_scenes(tiny.read(data.images), [parse_caption(c) for c in data.captions], details=True),
                   "reader": "attributes:unsaved"}
    assert out["per_attribute"]["count"] > 0.9 and out["per_attribute"]["relation"] > 0.9
    single = generate_single_objects(200, seed=EVAL_SEED, split="all")
    s = score_single_objects(tiny, single.images, single.labels, CFG)
    assert set(s["per_condition"]) == {"shape", "colour", "size", "cell"}
    assert s["per_condition"]["size"] > 0.9 and s["per_condition"]["cell"] > 0.9 and s["one_object"] > 0.9
    shuffled = {f: np.roll(v, 1) for f, v in single.labels.items()}  # labels of other images
    assert score_single_objects(tiny, single.images, shuffled, CFG)["per_condition"]["cell"] < 0.4


def test_fd_in_the_reader_feature_space_grows_with_noise(tiny):
    ref = scene_reference_statistics(tiny, 600, seed=1)
    assert ref.meta["extractor"] == tiny.extractor_id and ref.mu.shape == (tiny.feature_dim,)
    real = generate_shapes(600, seed=2, split="all").images
    rng = np.random.default_rng(0)
    fd = [reader_fd(tiny, np.clip(real + rng.normal(0, sigma, real.shape), 0, 255).astype(np.uint8), ref)
          for sigma in (0, 20, 50)]
    assert 0 <= fd[0] < fd[1] < fd[2] and fd[2] > 3 * fd[0], fd
    # the reader is a feature extractor of deltafm.eval.features: the one scoring function gives the same FD
    assert evaluate_samples(tiny, real, ref, progress=False)["fd"] == pytest.approx(fd[0], rel=1e-9)


def test_save_load_round_trip_is_bit_exact_and_checked(tiny, tmp_path):
    path = tmp_path / "reader.safetensors"
    digest = save_reader(tiny, path, meta={"note": "test"})
    assert path.stat().st_size < 1_000_000 and tiny.extractor_id == f"attributes:{digest}"
    back = load_reader(path, shapes=CFG)
    assert back.extractor_id == tiny.extractor_id and back.meta["note"] == "test"
    assert back.config == tiny.config
    a, b = tiny.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = generate_shapes(16, seed=9).images
    x = torch.from_numpy(images).float() / 127.5 - 1
    assert torch.equal(tiny.features(x), back.features(x)) and tiny.read(images) == back.read(images)

    with pytest.raises(EvalInputError, match="trained for other scenes: canvas 32"):
        load_reader(path, shapes=ShapesConfig(canvas=64))
    with pytest.raises(EvalInputError, match="colours"):
        load_reader(path, shapes=ShapesConfig(colours=("red", "green", "blue", "white"), heldout_fraction=0.1))
    with pytest.raises(EvalInputError, match=r"uint8 \(N, 3, 32, 32\)"):
        score_prompts(back, generate_shapes(2, config=ShapesConfig(canvas=64)).images, ["a circle"] * 2)
    with pytest.raises(EvalInputError, match="2 prompts or labels for 16 images"):
        score_prompts(back, images, ["a circle"] * 2)
    with pytest.raises(EvalInputError, match="prompt 1: cannot parse"):
        score_prompts(back, images[:2], ["a circle", "a red dog"])

    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    (tmp_path / "flipped.safetensors.sha256").write_text(f"{digest}  flipped.safetensors\n")
    with pytest.raises(EvalInputError, match="sha256 mismatch"):
        load_reader(bad)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(EvalInputError, match="not a safetensors file"):
        load_reader(tmp_path / "garbage.safetensors", verify=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_reader(tmp_path / "missing.safetensors")
    (tmp_path / "nosidecar.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="no hash sidecar"):
        load_reader(tmp_path / "nosidecar.safetensors")


def test_other_files_and_settings_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"deltafm": '{"format": "x"}'})
    with pytest.raises(EvalInputError, match="not an attribute reader"):
        load_reader(tmp_path / "other.safetensors", verify=False)
    with pytest.raises(EvalInputError, match="widths"):
        ReaderConfig(widths=(8, 8))
    with pytest.raises(EvalInputError, match="could hold two object centres"):
        ReaderConfig(canvas=64, size_px=(4, 13), gap_px=1)
    with pytest.raises(EvalInputError, match=r"\(N, 3, 32, 32\)"):
        AttributeReader().features(torch.zeros(1, 3, 64, 64))
    with pytest.raises(EvalInputError, match="seed"):
        ReaderRecipe(seed=EVAL_SEED)
    big = AttributeReader(ReaderConfig.from_shapes(ShapesConfig(canvas=64)))
    assert (big.config.stride, big.config.grid) == (8, 8)
    assert len(big.read(generate_shapes(2, config=ShapesConfig(canvas=64)).images, top1=True)) == 2


def test_training_is_deterministic_given_the_seed():
    def weights(seed: int) -> dict[str, torch.Tensor]:
        recipe = ReaderRecipe(scenes=64, epochs=1, batch_size=32, widths=(8, 8, 8), seed=seed)
        return train_reader(recipe, progress=False, evaluate=0).state_dict()

    a, b, c = weights(3), weights(3), weights(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


# --------------------------------------------------------------------------------------------------------------
# command line


def test_the_command_line_trains_and_scores(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert main(["train", "--out", str(out), "--scenes", "64", "--epochs", "1", "--batch-size", "32",
                 "--eval-scenes", "20", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sha256"] == (tmp_path / "r.safetensors.sha256").read_text().split()[0]
    assert set(summary["heldout"]) == {"all", "heldout"}
    data = generate_shapes(20, seed=3)
    np.savez(tmp_path / "s.npz", arr_0=data.images.transpose(0, 2, 3, 1))
    (tmp_path / "c.txt").write_text("\n".join(data.captions) + "\n")
    args = ["score", "--reader", str(out), "--images", str(tmp_path / "s.npz"), "--fd-scenes", "50"]
    assert main([*args, "--captions", str(tmp_path / "c.txt"), "--out", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["num_prompts"] == 20 and "fd" in result and set(result["per_attribute"]) >= {"relation"}
    capsys.readouterr()
    single = generate_single_objects(20, seed=3)
    ids, _ = single.class_ids(("colour", "shape"))
    np.savez(tmp_path / "one.npz", arr_0=single.images.transpose(0, 2, 3, 1), labels=ids)
    one = ["score", "--reader", str(out), "--images", str(tmp_path / "one.npz"), "--fd-scenes", "0"]
    assert main([*one, "--factors", "colour,shape"]) == 0
    assert set(json.loads(capsys.readouterr().out)["per_condition"]) == {"colour", "shape"}
    (tmp_path / "short.txt").write_text("a red circle\n")
    for bad, message in [([*args, "--captions", str(tmp_path / "short.txt")], "1 prompts or labels for 20 images"),
                         ([*one, "--factors", "colour,hue"], "unknown factor"),
                         ([*one, "--factors", "shape"], "labels must lie in 0..4"),
                         (["score", "--reader", str(tmp_path / "x"), "--images", "y", "--captions", "z"], "not found"),
                         (["train", "--out", str(tmp_path), "--scenes", "64"], "is a folder"),
                         (["train", "--out", str(out), "--epochs", "0"], "--epochs must be >= 1")]:
        assert main(bad) == 2
        assert message in capsys.readouterr().err or pytest.fail(f"{bad}: no {message!r}")
