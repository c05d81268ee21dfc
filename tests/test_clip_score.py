"""deltafm.eval.clip_score and ``deltafm clip-score`` on a tiny randomly initialised CLIPModel saved with its
processor: the per-pair score equals the cosine of transformers' own CLIPModel forward (logits_per_image
over exp(logit_scale), the model's definition of image-text similarity); repeated prompts, batch size and
grey images; the CLI on a samples file with sample.json; the errors a user meets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from cli_cases import run_cli  # noqa: E402
from deltafm.eval.clip_score import load_clip_scorer, summarise  # noqa: E402
from deltafm.eval.metrics import EvalInputError  # noqa: E402
from tiny_text import tiny_clip  # noqa: E402

WORDS = ["a", "red", "blue", "green", "circle", "square", "small", "big", "left", "of", "the"]
PROMPTS = ["a red circle", "a big blue square", "a small green circle left of a red square", "the blue circle"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip", WORDS, seed=0, image_size=16)


def _images(n: int, size: int = 24, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def _pairs(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def _transformers_cosines(folder: Path, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """cos(E_I, E_C) per pair from CLIPModel.forward's logits_per_image / exp(logit_scale)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(folder)).eval()
    proc = CLIPProcessor.from_pretrained(str(folder))
    out = []
    for img, p in zip(images, prompts):
        inputs = proc(text=[p], images=[img], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits_per_image
        out.append(float(logits[0, 0] / model.logit_scale.exp().detach()))
    return np.array(out)


def test_score_equals_the_cosine_of_the_clip_forward(clip_dir):
    images, prompts = _images(6), _pairs(6)
    scorer = load_clip_scorer(clip_dir)
    ours = scorer.score(images, prompts, batch_size=4)
    cos = _transformers_cosines(clip_dir, images, prompts)
    np.testing.assert_allclose(ours, np.maximum(100 * cos, 0), rtol=0, atol=1e-4)
    assert (cos < 0).any() and (cos > 0).any()  # random weights: both signs, so the clamp is exercised
    assert ours.min() == 0.0


def test_batching_repeats_layout_and_grey_images(clip_dir):
    scorer = load_clip_scorer(clip_dir)
    images, prompts = _images(5, seed=1), _pairs(5)
    one = scorer.score(images, prompts, batch_size=1)
    np.testing.assert_allclose(scorer.score(images, prompts, batch_size=64), one, atol=1e-5)
    np.testing.assert_allclose(scorer.score(images.transpose(0, 3, 1, 2), prompts), one, atol=1e-5)
    # a prompt's score does not depend on the other prompts encoded with it (padding, repeats)
    np.testing.assert_allclose(scorer.score(images[:1], prompts[:1]), one[:1], atol=1e-5)
    grey = _images(3, channels=1, seed=2)
    np.testing.assert_allclose(scorer.score(grey, prompts[:3]), scorer.score(np.repeat(grey, 3, -1), prompts[:3]),
                               atol=0)
    s = summarise(np.array([1.0, 2.0, 3.0, 6.0]))
    assert s["clip_score"] == 3.0 and s["n"] == 4 and s["clip_score_sd"] == pytest.approx(np.std([1, 2, 3, 6], ddof=1))
    assert s["clip_score_se"] == pytest.approx(s["clip_score_sd"] / 2)


def test_the_cli_reads_the_prompts_of_a_sample_folder(clip_dir, tmp_path):
    images, ids = _images(6, seed=3), np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "samples.npz", arr_0=images, prompt_ids=ids)
    (tmp_path / "sample.json").write_text(json.dumps({"conditioning": "text", "prompts": PROMPTS[:3]}))
    rc, out, err = run_cli(["clip-score", "--clip", str(clip_dir), "--images", str(tmp_path / "samples.npz"),
                            "--out", str(tmp_path / "cs.json")])
    assert rc == 0, err
    result = json.loads(out)
    want = load_clip_scorer(clip_dir).score(images, [PROMPTS[i] for i in ids])
    assert result["clip_score"] == pytest.approx(want.mean(), abs=1e-9) and result["n"] == 6
    assert result["per_prompt"][PROMPTS[1]] == pytest.approx(want[[1, 4]].mean(), abs=1e-9)
    assert result["clip_identity"].startswith("CLIPModel:")
    assert json.loads((tmp_path / "cs.json").read_text())["clip_score"] == result["clip_score"]
    # the same from a captions file
    (tmp_path / "c.txt").write_text("\n".join(PROMPTS[i] for i in ids) + "\n")
    rc, out2, err = run_cli(["clip-score", "--clip", str(clip_dir), "--images", str(tmp_path / "samples.npz"),
                             "--captions", str(tmp_path / "c.txt")])
    assert rc == 0, err and json.loads(out2)["clip_score"] == result["clip_score"]


def _text_only_clip(folder: Path) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case, needle", [
    ("hub", "hub ids are not downloaded"),
    ("missing", "no such folder"),
    ("text_only", "only one tower of CLIP"),
    ("no_processor", "no image-processor settings"),
    ("count", "6 images but 2 prompts"),
    ("no_sample_json", "no sample.json beside"),
    ("class_samples", "records no prompts"),
    ("empty_prompt", "prompt 1 is empty"),
    ("not_npz", "--images must be an .npz"),
])
def test_bad_input_is_one_error_line(clip_dir, tmp_path, case, needle):
    import shutil

    clip, images = str(clip_dir), tmp_path / "s" / "samples.npz"
    images.parent.mkdir()
    np.savez(images, arr_0=_images(6), prompt_ids=np.zeros(6, dtype=np.int64))
    (images.parent / "sample.json").write_text(json.dumps({"prompts": ["a red circle"]}))
    extra: list[str] = []
    if case == "hub":
        clip = "openai/clip-vit-large-patch14"
    elif case == "missing":
        clip = str(tmp_path / "nothing")
    elif case == "text_only":
        clip = str(_text_only_clip(tmp_path / "text"))
    elif case == "no_processor":
        clip = str(shutil.copytree(clip_dir, tmp_path / "copy"))
        for f in ("preprocessor_config.json", "processor_config.json"):
            (tmp_path / "copy" / f).unlink(missing_ok=True)
    elif case == "count":
        (tmp_path / "c.txt").write_text("a red circle\nthe blue circle\n")
        extra = ["--captions", str(tmp_path / "c.txt")]
    elif case == "no_sample_json":
        (images.parent / "sample.json").unlink()
    elif case == "class_samples":
        (images.parent / "sample.json").write_text(json.dumps({"num": 6, "class_names": ["a", "b"]}))
    elif case == "empty_prompt":
        (tmp_path / "c.txt").write_text("a red circle\n \na\na\na\na\n")
        extra = ["--captions", str(tmp_path / "c.txt")]
    elif case == "not_npz":
        images.write_text("not an archive")
    rc, out, err = run_cli(["clip-score", "--clip", clip, "--images", str(images), *extra])
    assert rc == 2 and out == "" and err.startswith("error:") and err.count("\n") == 1, err
    assert needle in err


def test_scorer_rejects_mismatched_counts(clip_dir):
    with pytest.raises(EvalInputError, match="3 images but 2 prompts"):
        load_clip_scorer(clip_dir).score(_images(3), PROMPTS[:2])
