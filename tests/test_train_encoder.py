"""``deltafm train-encoder``: a tiny Dinov2Model on the bundled digits, end to end through the CLI.

Exact checks: the folder loads with ``load_encoder`` (same identity as recorded) and gives tokens of the
trained grid; its ``image_mean``/``image_std`` are the training pixels' statistics recomputed here; the
recorded held-out accuracy is recomputed from the saved encoder and head through the use-time
preprocessing (so training and use see the same inputs); the same seed gives the same weights; an
existing folder is refused; bad input is one ``error:`` line, exit 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from cli_cases import run_cli, tree_digest  # noqa: E402
from deltafm.data import load_dataset  # noqa: E402
from deltafm.encoders import load_encoder, preprocess  # noqa: E402
from deltafm.pixels import uint8_to_model  # noqa: E402
from deltafm.prepare.encoder_train import channel_stats, lr_at, random_flip, random_shift  # noqa: E402

TINY = ["--dataset", "digits", "--max-items", "512", "--depth", "1", "--hidden", "32", "--heads", "2",
        "--epochs", "1", "--batch-size", "128", "--warmup", "1", "--no-progress"]


def _train(out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(["train-encoder", *TINY, *extra, "--out", str(out)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "digits-enc"
    rc, stdout, err = _train(out)
    assert rc == 0, err
    assert "held-out accuracy" in stdout
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_the_folder_loads_as_an_encoder(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["classifier_head.safetensors", "config.json",
                                                         "model.safetensors", "preprocessor_config.json",
                                                         "train_encoder.json"]
    enc = load_encoder(trained)
    record = json.loads((trained / "train_encoder.json").read_text())
    assert enc.identity == record["identity"] and enc.name == "digits-enc" == record["name"]
    assert (enc.embed_dim, enc.patch_size, record["grid"], record["image_size"]) == (32, 4, [7, 7], 28)
    assert record["data"]["train_items"] == 512 and record["data"]["heldout_source"] == "test split"
    assert record["settings"]["seed"] == 0 and record["versions"]["torch"] == torch.__version__
    assert record["augmentation"] == {"shift_px": 0, "flip": False}  # digits: no mirroring
    assert record["duration_s"] > 0 and "not the network that computes the evaluation metrics" in record["note"]
    x = uint8_to_model(load_dataset("digits", split="test").images[:5])  # 8 x 8 gray
    assert enc(x, (7, 7)).shape == (5, 49, 32)
    assert enc(x, (4, 4)).shape == (5, 16, 32)


def test_mean_std_are_the_training_pixels_and_the_accuracy_is_reproduced(trained):
    from safetensors.torch import load_file

    train = load_dataset("digits", split="train", max_items=512).images.to(torch.float64) / 255
    m, s = train.mean().item(), train.std(unbiased=False).item()
    enc = load_encoder(trained)
    assert enc.image_mean == (torch.tensor(m, dtype=torch.float32).item(),) * 3
    assert torch.allclose(enc.std.flatten().double(), torch.full((3,), s, dtype=torch.float64), atol=1e-7)
    head = load_file(str(trained / "classifier_head.safetensors"))
    held = load_dataset("digits", split="test")
    pixels = preprocess(uint8_to_model(held.images), enc.mean, enc.std, (28, 28))
    with torch.no_grad():
        h = enc.model(pixel_values=pixels).last_hidden_state
        logits = torch.cat([h[:, 0], h[:, 1:].mean(1)], -1) @ head["weight"].T + head["bias"]
    acc = (logits.argmax(-1) == held.labels).double().mean().item()
    record = json.loads((trained / "train_encoder.json").read_text())
    assert acc == pytest.approx(record["metrics"]["heldout_accuracy"], abs=1e-12)
    assert record["metrics"]["heldout_items"] == 360


def test_the_same_seed_gives_the_same_weights(trained, tmp_path):
    assert _train(tmp_path / "again")[0] == 0
    a, b = _weights(trained), _weights(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_encoder(tmp_path / "again").identity == load_encoder(trained).identity
    assert _train(tmp_path / "other", "--seed", "1")[0] == 0
    c = _weights(tmp_path / "other")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_an_existing_folder_is_refused_unless_overwrite(trained, tmp_path):
    before = tree_digest(trained)
    rc, _, err = _train(trained)
    assert rc == 2 and err.strip().splitlines() == [f"error: --out {trained} is not empty; choose another folder "
                                                    "or pass --overwrite to replace it"]
    assert tree_digest(trained) == before
    out = tmp_path / "copy"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert _train(out, "--overwrite", "--epochs", "2")[0] == 0
    assert not (out / "old.txt").exists() and load_encoder(out).embed_dim == 32
    assert json.loads((out / "train_encoder.json").read_text())["train"]["epochs"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".del-"))]


@pytest.mark.parametrize("change, message", [
    (["--heads", "3"], "--hidden 32 must be a multiple of --heads 3"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be finite and > 0"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the 512 training images"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "latents", "--root", "/tmp"], "not held in memory as labelled images"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda[:N]"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--grid", "x"], "argument --grid: invalid int value: 'x'"),
])
def test_bad_input_is_one_error_line(tmp_path, change, message):
    out = tmp_path / "enc"
    rc, _, err = _train(out, *change)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_channel_stats_augmentation_and_schedule():
    imgs = torch.tensor([[[[0, 255]]], [[[51, 102]]]], dtype=torch.uint8)  # (2, 1, 1, 2)
    mean, std = channel_stats(imgs)
    u = torch.tensor([0.0, 1.0, 0.2, 0.4], dtype=torch.float64)
    assert mean == (u.mean().item(),) * 3 and std == pytest.approx((u.std(unbiased=False).item(),) * 3, abs=1e-15)
    rgb = torch.randint(0, 256, (3, 3, 4, 4), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    m3, s3 = channel_stats(rgb)
    v = rgb.double() / 255
    assert m3 == tuple(v.mean(dim=(0, 2, 3)).tolist())
    assert s3 == pytest.approx(tuple(v.std(dim=(0, 2, 3), unbiased=False).tolist()), abs=1e-15)
    with pytest.raises(ValueError, match="constant in a channel"):
        channel_stats(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))

    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    g = torch.Generator().manual_seed(0)
    y = random_shift(x, 2, g)
    d = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(0)) - 2  # the same draws
    for i in range(2):
        dy, dx = int(d[0, i]), int(d[1, i])
        ref = torch.full((5, 5), -1.0)
        src = x[i, 0]
        ys, xs = slice(max(0, -dy), 5 - max(0, dy)), slice(max(0, -dx), 5 - max(0, dx))
        yd, xd = slice(max(0, dy), 5 - max(0, -dy)), slice(max(0, dx), 5 - max(0, -dx))
        ref[ys, xs] = src[yd, xd]
        assert torch.equal(y[i, 0], ref), (dy, dx)
    assert torch.equal(random_shift(x, 0, g), x)
    y = random_flip(x, torch.Generator().manual_seed(3))
    mirrored = torch.rand(2, generator=torch.Generator().manual_seed(3)) < 0.5
    for i in range(2):
        assert torch.equal(y[i], x[i].flip(-1) if mirrored[i] else x[i])

    from deltafm.prepare.encoder_config import EncoderSettings

    s = EncoderSettings(lr=1.0, warmup=4)
    assert [lr_at(k, 12, s) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(8, 12, s) == pytest.approx(0.5) and lr_at(12, 12, s) == pytest.approx(0.0)
