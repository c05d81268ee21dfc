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


def clip_tokenizer(words: list[str]):
    """A CLIP BPE over ``words``: every letter, every letter + </w>, and left-to-right merges building each word."""
    from transformers import CLIPTokenizer

    letters = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for t in [*letters, *(c + "</w>" for c in letters)]:
        vocab.setdefault(t, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        pieces = [*w[:-1], w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur += p
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, as in CLIP
    return CLIPTokenizer(vocab=vocab, merges=merges), vocab


def tiny_clip(folder: Path, words: list[str], seed: int = 0, image_size: int = 16) -> Path:
    """Write a tiny randomly initialised whole ``CLIPModel`` (text and vision towers, projections 24-d) with
    its processor (the CLIP BPE over ``words`` and a ``CLIPImageProcessor`` at ``image_size``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    tok, vocab = clip_tokenizer(words)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=24, projection_dim=24,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=8, projection_dim=24)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=24))
    model.save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder
