"""Text conditioning at scale: ``conditioning.text_table`` (a float16 table of every caption, or the batch's
captions encoded each step), ``conditioning.truncate``, and text-to-image runs on captioned tars and latents.
Batch mode gives the table's condition before its float16 rounding, and a batch-mode run resumes bit-exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import deltafm.train.conditions as conditions_module
from deltafm.data import DataError, ImageDataset, load_dataset
from deltafm.train.builders import SetupError
from deltafm.train.conditions import TABLE_LIMIT, Conditions, table_bytes
from deltafm.train.config import ConfigError, load_config
from test_captions import _meta, _png, _tar, cc3m_tars
from test_conditions_train import FAST, _records, _same_checkpoints, _text, _train
from tiny_text import tiny_bert

LONG = "a small red circle to the left of a blue square " * 5  # 55 words: 57 tokens with [CLS] and [SEP]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """The tiny BERT of tests/test_conditions_train.py: word-level tokenizer over the shapes captions' words."""
    pytest.importorskip("transformers")
    words = sorted({w.strip(",.:") for c in load_dataset("shapes-scenes", max_items=400).captions
                    for w in c.split()} - {""})
    return tiny_bert(tmp_path_factory.mktemp("text") / "tiny-bert", words, seed=0)


def _conditions(text_dir: Path, dataset, *extra: str, device: str = "cpu") -> Conditions:
    cfg = load_config(None, [*FAST, *_text(text_dir), *extra])
    conds = Conditions.from_config(cfg.conditioning, dataset, torch.device(device), progress=False)
    assert conds is not None
    return conds


def _captioned(captions: list[str]) -> ImageDataset:
    n = len(captions)
    return ImageDataset(images=torch.zeros(n, 3, 16, 16, dtype=torch.uint8), labels=torch.zeros(n, dtype=torch.long),
                        num_classes=1, name="captioned", captions=tuple(captions),
                        caption_ids=torch.arange(n, dtype=torch.long))


def test_batch_mode_is_the_table_before_its_float16_rounding(text_dir):
    scenes = load_dataset("shapes-scenes", max_items=32, image_size=16)
    table = _conditions(text_dir, scenes, "conditioning.text_table=table")
    batch = _conditions(text_dir, scenes, "conditioning.text_table=batch")
    assert (table.mode, batch.mode) == ("table", "batch") and batch.table is None
    idx = torch.tensor([5, 0, 17, 5])
    extras = scenes.load_extras(idx, batch.extra_names)
    t, b = table(scenes.labels[idx], extras), batch(scenes.labels[idx], extras)
    assert b.tokens.dtype == torch.float32 and not torch.equal(b.tokens, b.tokens.half().float())
    # the table holds the batch's features in float16. The table was encoded in chunks of other captions
    # (sorted by length), so with several threads a row's float32 features can differ in the last bits from
    # the batch's own encode (another batch shape), and its float16 rounding by one float16 step.
    torch.testing.assert_close(t.tokens, b.tokens.half().float(), rtol=0, atol=2e-3)
    assert torch.equal(t.mask, b.mask) and torch.equal(t.null, b.null)
    torch.testing.assert_close(t.pooled, b.pooled, rtol=1e-5, atol=1e-6)
    want = batch.encoder.encode([scenes.captions[int(scenes.caption_ids[i])] for i in idx], 48)
    assert torch.equal(b.tokens, want.tokens) and torch.equal(b.pooled, want.pooled)
    grid, titles = batch.for_grid(scenes, 3)
    assert titles == [scenes.captions[int(c)] for c in scenes.caption_ids[:3]] and grid.tokens.shape == (3, 48, 16)


def test_auto_mode_takes_the_table_up_to_the_limit(text_dir, monkeypatch):
    assert TABLE_LIMIT == 2 * 1024**3
    assert table_bytes(3_300_000, 77, 768, 768) == 3_300_000 * (77 * 768 * 2 + 77 + 768 * 4) > TABLE_LIMIT  # CC3M
    scenes = load_dataset("shapes-scenes", max_items=32, image_size=16)
    size = table_bytes(len(scenes.captions), 48, 16, 16)
    monkeypatch.setattr(conditions_module, "TABLE_LIMIT", size)
    assert _conditions(text_dir, scenes).mode == "table"
    monkeypatch.setattr(conditions_module, "TABLE_LIMIT", size - 1)
    assert _conditions(text_dir, scenes).mode == "batch"


def test_over_long_captions_are_refused_at_start_unless_truncated(text_dir):
    ds = _captioned(["a red circle", "two blue squares", LONG])
    shown = re.escape(repr(LONG[:80] + "..."))
    for mode in ("table", "batch"):
        with pytest.raises(SetupError, match=rf"text conditioning: caption 2 \({shown}\): it is 57 tokens, more than "
                                             r"max_tokens of 48; shorten it; or set conditioning.truncate=true"):
            _conditions(text_dir, ds, f"conditioning.text_table={mode}")
    table = _conditions(text_dir, ds, "conditioning.text_table=table", "conditioning.truncate=true")
    batch = _conditions(text_dir, ds, "conditioning.text_table=batch", "conditioning.truncate=true")
    assert table.describe()["text"]["truncate"] is True
    ids = torch.tensor([2, 0])
    t, b = table(ids, {"caption": ids}), batch(ids, {"caption": ids})
    cut = table.encoder.encode([LONG, "a red circle"], 48, truncate=True)
    assert bool(b.mask[0].all()) and int(b.mask[1].sum()) < 48  # the long caption fills all 48 tokens
    assert torch.equal(b.tokens, cut.tokens) and torch.equal(t.tokens, cut.tokens.half().float())
    assert torch.equal(t.pooled, cut.pooled) and torch.equal(b.mask, cut.mask)
    with pytest.raises(SetupError, match="max_tokens 80 is above encoder 'tiny-bert''s maximum of 64 tokens"):
        _conditions(text_dir, ds, "conditioning.text_table=batch", "conditioning.truncate=true",
                    "conditioning.max_tokens=80")  # found at start, not at the first step


def test_captions_missing_in_the_data_are_named_before_the_encoder_loads(tmp_path, text_dir):
    _tar(tmp_path / "t" / "bad.tar", [("a", {"png": _png((1, 1, 1)), "txt": b"x"}),
                                      ("b", {"png": _png((2, 2, 2)), "json": _meta("b")})])
    ds = load_dataset("webdataset", root=str(tmp_path / "t"), image_size=16)
    with pytest.raises(DataError, match=r"bad.tar:b has no caption"):
        _conditions(tmp_path / "no-encoder-here", ds)
    with pytest.raises(SetupError, match="needs captions; dataset 'digits' has none"):
        _conditions(text_dir, load_dataset("digits"))


def test_text_table_keys_are_checked():
    with pytest.raises(ConfigError, match="'conditioning.text_table' applies to conditioning.kind=text only"):
        load_config(None, [*FAST, "conditioning.text_table=batch"])
    with pytest.raises(ConfigError, match="'conditioning.truncate' applies to conditioning.kind=text only"):
        load_config(None, [*FAST, "conditioning.truncate=true"])
    with pytest.raises(ConfigError, match="conditioning.text_table"):
        load_config(None, [*FAST, "conditioning.kind=text", "conditioning.text_encoder=minilm",
                           "conditioning.text_table=stream"])


def test_batch_mode_runs_resume_bit_exactly(tmp_path, text_dir, monkeypatch):
    modes = []
    call = Conditions.__call__

    def spy(self, y, extras):
        modes.append(self.mode)
        return call(self, y, extras)

    monkeypatch.setattr(Conditions, "__call__", spy)
    over = [*_text(text_dir), "conditioning.text_table=batch"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train([*over, "train.steps=4", "train.ckpt_every=2"], whole)
    _train([*over, "train.steps=2", "train.ckpt_every=2"], split)
    _train([*over, "train.steps=4", "train.ckpt_every=2"], split, resume="auto")
    _same_checkpoints(whole, split)
    assert [r["loss"] for r in _records(whole)][2:] == [r["loss"] for r in _records(split)][2:]
    assert len(modes) == 8 and set(modes) == {"batch"}


@pytest.mark.parametrize("data", ["webdataset", "latents"])
def test_text_to_image_on_captioned_tars_and_latents(data, tmp_path, text_dir):
    """The CC3M layout end to end: img2dataset-style tars, streamed as pixels or encoded to latents first."""
    cc3m_tars(tmp_path / "cc3m")
    root, model = tmp_path / "cc3m", "MMDiT-N/4"
    if data == "latents":
        pytest.importorskip("diffusers")
        from test_prepare_latents import make_vae, prepare

        rc, _, err = prepare(str(root), tmp_path / "lat", make_vae(tmp_path / "vae"), "--flip")
        assert rc == 0, err
        root, model = tmp_path / "lat", "MMDiT-N/2"
    over = [*_text(text_dir)[1:], f"data.name={data}", f"data.root={root}", f"model.name={model}",
            "train.batch_size=4", "train.steps=2", "train.ckpt_every=2", "conditioning.text_table=batch"]
    if data == "latents":
        over.append("data.image_size=null")
    result = _train(over, tmp_path / "run")
    assert result.status == "done" and result.images_seen == 8


def test_the_cc3m_preset_follows_the_reference_text_to_image_recipe():
    from deltafm.train.config import find_preset

    cfg = load_config(find_preset("cc3m256-t2i-mmdit-d24-deltafm"))
    assert cfg.model.name == "MMDiT-d24/2" and cfg.data.name == "latents"
    assert cfg.optim.lr == 1e-4 and cfg.optim.grad_clip == 1.0 and cfg.optim.weight_decay == 0.0
    assert cfg.train.batch_size == 256 and cfg.train.ema_decay == 0.9999 and cfg.objective.lam == 0.05
    c = cfg.conditioning
    assert (c.kind, c.max_tokens, c.text_table, c.truncate) == ("text", 77, "auto", True)
    assert c.text_encoder == "/path/to/clip-vit-large-patch14"  # the placeholder the user replaces
    assert table_bytes(3_300_000, c.max_tokens, 768, 768) > TABLE_LIMIT  # auto: batch mode for CC3M
