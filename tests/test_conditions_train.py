"""Training on several named conditions or on text: runs, resumes bit-exactly, samples, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltafm.conditioning import Labels, MultiCond, TextCond
from deltafm.data import load_dataset
from deltafm.train.builders import SetupError
from deltafm.train.checkpoint import list_checkpoints, load_checkpoint
from deltafm.train.conditions import Conditions
from deltafm.train.config import ConfigError, load_config
from deltafm.train.loop import train
from deltafm.train.restore import load_for_sampling
from tiny_text import tiny_bert

FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "log.every=1", "sample.every=-1",
        "train.batch_size=16", "optim.lr=1e-3", "data.max_items=64", "data.image_size=16", "train.ema_decay=0.9",
        "train.steps=1"]
MULTI = ["data.name=shapes", "model.name=SiT-N/4", "conditioning.kind=multi", "conditioning.parts=[shape, colour]",
         "conditioning.contrast_on=shape", "objective.negatives=different_class", "conditioning.joint_dropout=0.1",
         "conditioning.dropout={colour: 0.3}"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised BERT with a word-level tokenizer over the shapes captions' words."""
    pytest.importorskip("transformers")
    return tiny_bert(tmp_path_factory.mktemp("text") / "tiny-bert")


def _text(text_dir: Path) -> list[str]:
    return ["data.name=shapes-scenes", "model.name=MMDiT-N/4", "conditioning.kind=text",
            f"conditioning.text_encoder={text_dir}", "conditioning.max_tokens=48", "objective.label_dropout=0.2"]


def _train(overrides: list[str], out: Path, resume=None):
    with torch.random.fork_rng(devices=[]):
        return train(load_config(None, [*FAST, *overrides]), out, resume=resume)


def _same_checkpoints(a: Path, b: Path) -> None:
    ca = load_checkpoint(list_checkpoints(a / "checkpoints")[-1])
    cb = load_checkpoint(list_checkpoints(b / "checkpoints")[-1])
    for part in ("model", "ema"):
        wa, wb = getattr(ca, part), getattr(cb, part)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize("kind", ["multi", "text"])
def test_conditioned_runs_resume_bit_exactly_and_sample(kind, tmp_path, request):
    over = MULTI if kind == "multi" else _text(request.getfixturevalue("text_dir"))
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train([*over, "train.steps=4", "train.ckpt_every=2"], whole)
    _train([*over, "train.steps=2", "train.ckpt_every=2"], split)
    _train([*over, "train.steps=4", "train.ckpt_every=2"], split, resume="auto")
    _same_checkpoints(whole, split)
    assert [r["loss"] for r in _records(whole)][2:] == [r["loss"] for r in _records(split)][2:]
    lm = load_for_sampling(whole)
    conds = Conditions.from_description(lm.data.conditioning)
    assert conds is not None and conds.kind == kind
    if kind == "multi":
        assert lm.data.conditioning["values"]["shape"][0] == "circle"
        cond = conds.from_values([{"shape": "circle", "colour": "red"}, {"shape": "cross"}])
        assert int(cond["colour"].ids[1]) == len(conds.values["colour"])  # not given: the null value
        assert lm.objective.num_classes == 5 and lm.objective.contrast_on == "shape"
    else:
        cond = conds.encode(["a small red circle", "two blue squares"])
        assert isinstance(cond, TextCond) and cond.tokens.shape[1] == 48
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        v = lm.model(x, torch.rand(2), cond)
    assert v.shape == x.shape and bool(torch.isfinite(v).all())


def test_the_batch_condition_is_the_items_own(text_dir):
    """Multi: the ids of the items drawn; text: the encoded caption of each item."""
    ds = load_dataset("shapes", max_items=32, image_size=16)
    cfg = load_config(None, [*FAST, *MULTI])
    multi = Conditions.from_config(cfg.conditioning, ds, torch.device("cpu"))
    idx = torch.tensor([5, 0, 17])
    cond = multi(ds.labels[idx], ds.load_extras(idx, multi.extra_names))
    assert isinstance(cond, MultiCond) and cond.names == ("shape", "colour")
    assert torch.equal(cond["colour"].ids, ds.conditions["colour"][idx]) and cond["colour"].num_classes == 7
    assert isinstance(cond["shape"], Labels) and torch.equal(cond["shape"].ids, ds.labels[idx])
    scenes = load_dataset("shapes-scenes", max_items=32, image_size=16)
    cfg = load_config(None, [*FAST, *_text(text_dir)])
    text = Conditions.from_config(cfg.conditioning, scenes, torch.device("cpu"), progress=False)
    got = text(scenes.labels[idx], scenes.load_extras(idx, text.extra_names))
    want = text.encoder.encode([scenes.captions[int(scenes.caption_ids[i])] for i in idx], 48)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=0, atol=2e-3)  # the table keeps float16 tokens
    # pooled: float32 of the table's encode (chunks sorted by length) vs this batch's: equal up to rounding
    torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.mask, want.mask) and not bool(got.null.any())


def test_bad_conditioning_is_a_clear_error(tmp_path, text_dir):
    with pytest.raises(SetupError, match="has none"):
        _train(["data.name=digits", "conditioning.kind=multi", "train.steps=1", "data.image_size=null"], tmp_path / "a")
    with pytest.raises(SetupError, match="not in dataset"):
        _train([*MULTI[:4], "conditioning.parts=[hue]", "train.steps=1"], tmp_path / "b")
    with pytest.raises(ConfigError, match="contrast_on"):
        load_config(None, [*FAST, *MULTI, "conditioning.contrast_on=null"])
    with pytest.raises(ConfigError, match="text_encoder"):
        load_config(None, [*FAST, "conditioning.kind=text"])
    with pytest.raises(SetupError, match="needs a text-conditioned model"):
        _train([*_text(text_dir), "model.name=SiT-N/4", "train.steps=1"], tmp_path / "c")
    with pytest.raises(SetupError, match="no such folder|not a folder|does not exist"):
        _train([*_text(text_dir)[:3], f"conditioning.text_encoder={tmp_path / 'none'}", "train.steps=1"],
               tmp_path / "d")
    assert not any((tmp_path / n).exists() and any((tmp_path / n).iterdir()) for n in "abcd")


def test_grids_and_sample_share_the_guidance_rule():
    """Per-part weights where any is given (a part without its own gets the joint scale), for every part the
    run conditions on, also when conditioning.parts is empty (all the dataset's parts)."""
    from types import SimpleNamespace

    from deltafm.train.bookkeeping import _guidance
    from deltafm.train.conditions import part_weights

    assert part_weights(["shape", "colour"], {}, 1.5) == 1.5
    assert part_weights(["shape", "colour"], {"shape": 3}, 1.5) == {"shape": 3.0, "colour": 1.5}
    cfg = load_config(None, [*FAST, *MULTI[:4], "conditioning.parts=[]", "conditioning.guidance={shape: 3}",
                             "sample.cfg=2.0"])
    ds = load_dataset("shapes", max_items=32, image_size=16)
    conds = Conditions.from_config(cfg.conditioning, ds, torch.device("cpu"))
    run = SimpleNamespace(cfg=cfg, conditions=conds)
    assert _guidance(run) == {"shape": 3.0, "colour": 2.0, "size": 2.0, "cell": 2.0}
    assert _guidance(SimpleNamespace(cfg=cfg, conditions=None)) == 2.0
