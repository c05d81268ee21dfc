"""A tiny randomly initialised BERT text encoder for tests: word-level tokenizer over the shapes captions'
words, saved with save_pretrained, loadable by deltafm.encoders.load_text_encoder (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch


def shapes_words(max_items: int = 400) -> list[str]:
    """The distinct words of the first ``max_items`` shapes-scenes captions."""
    from deltafm.data import load_dataset

    return sorted({w.strip(",.:") for c in load_dataset("shapes-scenes", max_items=max_items).captions
                   for w in c.split()} - {""})


def tiny_bert(folder: Path, words: list[str] | None = None, seed: int = 0) -> Path:
    """Write the tiny BERT (hidden 16, 1 layer) with a vocabulary of ``words`` (default the shapes words)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = shapes_words() if words is None else words
    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", ":", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=len(words) + 8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    return folder
