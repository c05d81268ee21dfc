"""The text-table disk cache: keyed by encoder identity, padding, truncation and the captions; a hit is the
table a fresh encode gives; damaged files and DELTAFM_CACHE_DIR=off fall back to encoding."""

from __future__ import annotations

import pytest
import torch

from deltafm.conditioning import TextCond
from deltafm.train import text_cache
from deltafm.train.text_cache import load_table, save_table, table_key
from tiny_text import shapes_words, tiny_bert


def _table(n: int = 3) -> TextCond:
    g = torch.Generator().manual_seed(0)
    return TextCond.from_features(torch.randn(n, 4, 5, generator=g), torch.ones(n, 4, dtype=torch.bool),
                                  torch.randn(n, 2, generator=g))


def test_key_changes_with_everything_that_determines_the_table() -> None:
    base = table_key("Enc:1", 8, False, ["a red circle", "two squares"])
    assert base == table_key("Enc:1", 8, False, ["a red circle", "two squares"])
    others = [table_key("Enc:2", 8, False, ["a red circle", "two squares"]),
              table_key("Enc:1", 9, False, ["a red circle", "two squares"]),
              table_key("Enc:1", 8, True, ["a red circle", "two squares"]),
              table_key("Enc:1", 8, False, ["two squares", "a red circle"]),
              table_key("Enc:1", 8, False, ["a red circle", "two square", "s"])]
    assert len({base, *others}) == 6


def test_round_trip_damaged_file_and_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DELTAFM_CACHE_DIR", str(tmp_path))
    table = _table()
    path = save_table("k1", table)
    got = load_table("k1")
    assert path is not None and got is not None
    assert torch.equal(got.tokens, table.tokens.half()) and torch.equal(got.mask, table.mask)
    assert torch.equal(got.pooled, table.pooled) and not bool(got.null.any())
    assert load_table("k2") is None
    path.write_bytes(b"not a safetensors file")
    assert load_table("k1") is None
    save_table("k1", table)
    (tmp_path / "text-tables" / "k1.safetensors").rename(tmp_path / "text-tables" / "k3.safetensors")
    assert load_table("k3") is None  # a file whose stored key is another one
    monkeypatch.setenv("DELTAFM_CACHE_DIR", "off")
    assert text_cache.cache_dir() is None and save_table("k4", table) is None and load_table("k1") is None


def test_a_run_reuses_the_cached_table(tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    from deltafm.data import load_dataset
    from deltafm.train.conditions import Conditions
    from deltafm.train.config import load_config

    monkeypatch.setenv("DELTAFM_CACHE_DIR", str(tmp_path / "cache"))
    ds = load_dataset("shapes-scenes", max_items=40, image_size=16)
    folder = tiny_bert(tmp_path / "bert", shapes_words(40))
    cfg = load_config(None, ["train.steps=1", "conditioning.kind=text", f"conditioning.text_encoder={folder}",
                             "conditioning.max_tokens=48", "model.name=MMDiT-N/4"]).conditioning
    first = Conditions.from_config(cfg, ds, torch.device("cpu"), progress=False)
    assert len(list((tmp_path / "cache" / "text-tables").glob("*.safetensors"))) == 1
    calls = []
    monkeypatch.setattr(Conditions, "encode", lambda self, *a, **k: calls.append(1))
    second = Conditions.from_config(cfg, ds, torch.device("cpu"), progress=False)
    assert not calls  # the table came from the cache, bit for bit
    for f in ("tokens", "mask", "pooled", "null"):
        assert torch.equal(getattr(first.table, f), getattr(second.table, f))
