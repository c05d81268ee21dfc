"""REPA targets on the data path: ``prepare-latents --encoder/--keep-images`` -> shards -> LatentStore -> loader.

Shards are made by the real command (a tiny random diffusers AutoencoderKL, and tiny random transformers
``Dinov2Model`` folders loaded through :func:`deltafm.encoders.load_encoder`). Checked against independent
computations: the stored images are the ADM crops (and their mirrors), the stored features are the encoder
applied to those images, batch by batch as the command runs it, cast to float16 (exactly); the latents do
not change when extras are added; :meth:`LatentStore.load_extras` returns those rows for any index order
and subset; :class:`BatchLoader` gives the same (x, y, extras) with 0 and 1 workers, and the same x and y
as without extras; a restart with other encoders, and asking for extras the shards lack, are errors that
say what to run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from cli_cases import tree_digest
from deltafm.data import Batch, BatchLoader, DataError, EpochBatchSampler, LatentStore, batches, load_dataset
from deltafm.data.latent_format import feature_metadata, read_latent_moments, shard_header
from deltafm.data.latents import write_latent_shards
from deltafm.encoders import ModuleEncoder, load_encoder
from test_prepare_latents import SIZE, make_image_tree, make_vae, prepare, ref_crop, shards

GRID = 4  # default: latent side (16 / 2 = 8) // 2
OPTS = ("--flip", "--shard-size", "5", "--batch-size", "2")  # 12 images -> 24 items in shards 5,5,5,5,4


def make_dino(folder: Path, seed: int = 0) -> Path:
    """A tiny random DINOv2 (hidden 32, 2 layers, 2 heads, MLP 64, patch 4) saved with save_pretrained."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, patch_size=4, image_size=SIZE))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    return make_parts(tmp_path_factory.mktemp("repa"))


def make_parts(base: Path) -> dict[str, Path]:
    """The VAE, two encoders, the image tree, and folders prepared with extras and without."""
    vae, root = make_vae(base / "vae"), base / "imagenet"
    files = make_image_tree(root)
    d = {"vae": vae, "root": root, "dino": make_dino(base / "dino"), "dino2": make_dino(base / "dino2", seed=1),
         "extras": base / "extras", "plain": base / "plain"}
    rc, out, err = prepare(str(root), d["extras"], vae, *OPTS, "--encoder", str(d["dino"]), "--encoder",
                           str(d["dino2"]), "--keep-images")
    assert rc == 0, err
    assert "features.dino: 16×32 float16 encoder tokens an item" in out and "images: 3×16×16 uint8" in out, out
    rc, _, err = prepare(str(root), d["plain"], vae, *OPTS)
    assert rc == 0, err
    d["files"] = files  # type: ignore[assignment]
    return d


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------------------------- the shards


def test_shards_hold_the_crops_and_the_encoders_tokens_of_them(parts):
    crops = [ref_crop(p) for p, _ in parts["files"]]
    items = [torch.from_numpy(np.ascontiguousarray(v)) for a in crops for v in (a, a[:, :, ::-1])]  # flips
    encoders = {n: load_encoder(parts[n]) for n in ("dino", "dino2")}
    paths, plain = shards(parts["extras"]), shards(parts["plain"])
    assert len(paths) == 5
    start = 0
    for path, ref_path in zip(paths, plain):
        t = _tensors(path)
        n = t["latents"].shape[0]
        assert set(t) == {"latents", "latents_std", "labels", "features.dino", "features.dino2", "images"}
        assert torch.equal(t["images"], torch.stack(items[start:start + n]))  # the crops, mirrors right after
        for name, enc in encoders.items():
            want = torch.cat([enc(t["images"][b:b + 2].float() / 127.5 - 1, grid=(GRID, GRID))
                              for b in range(0, n, 2)])  # batches of 2 from the shard's start, as the command
            got = t[f"features.{name}"]
            assert got.dtype == torch.float16 and got.shape == (n, GRID * GRID, 32)
            assert torch.equal(got, want.half())
        z, s, y, meta = read_latent_moments(path)  # the latents do not change when extras are added
        z0, s0, y0, meta0 = read_latent_moments(ref_path)
        assert torch.equal(z, z0) and torch.equal(s, s0) and torch.equal(y, y0)
        assert meta["features.dino.identity"] == encoders["dino"].identity != meta["features.dino2.identity"]
        assert (meta["features.dino.grid"], meta["features.dino.dim"]) == ("4,4", "32")
        assert not any(k.startswith("features.") for k in meta0)
        assert shard_header(path).extras == {"features.dino": (16, 32), "features.dino2": (16, 32),
                                             "images": (3, SIZE, SIZE)}
        start += n
    # the flipped copy's features are those of the mirrored image, not the same as the original's
    t = _tensors(paths[0])
    assert not torch.equal(t["features.dino"][0], t["features.dino"][1])


def test_the_store_reads_extras_for_any_order_and_subset(parts):
    store = load_dataset("latents", parts["extras"])
    assert isinstance(store, LatentStore) and store.extra_names == ("features.dino", "features.dino2", "images")
    info = store.feature_info["dino"]
    assert info == {"encoder": "dino", "tensor": "features.dino", "identity": load_encoder(parts["dino"]).identity,
                    "grid": (4, 4), "dim": 32, "tokens": 16}
    every = [_tensors(p) for p in shards(parts["extras"])]
    full = {k: torch.cat([t[k] for t in every]) for k in ("features.dino", "images")}
    for order in ([7, 0, 13, 5, 23, 6], [5, 5, 4], list(range(24))[::-1], []):
        idx = torch.tensor(order, dtype=torch.long)
        got = store.load_extras(idx, ["images", "features.dino"])
        assert list(got) == ["images", "features.dino"]
        assert got["features.dino"].dtype == torch.float32 and got["features.dino"].shape == (len(order), 16, 32)
        assert torch.equal(got["features.dino"], full["features.dino"][idx].float())
        assert got["images"].dtype == torch.uint8 and torch.equal(got["images"], full["images"][idx])
    sub = store.subset([9, 3, 20])
    assert torch.equal(sub.load_extras(torch.tensor([2, 0]), ["images"])["images"], full["images"][[20, 9]])
    assert store.load_extras(torch.tensor([1]), []) == {}
    with pytest.raises(DataError, match=r"do not hold features\.dinov3 \(they hold features\.dino, features\.dino2, "
                                        r"images\).*prepare-latents --encoder"):
        store.load_extras(torch.tensor([0]), ["features.dinov3"])
    with pytest.raises(IndexError):
        store.load_extras(torch.tensor([24]), ["images"])


def test_the_loader_carries_extras_without_changing_x(parts):
    store = LatentStore(parts["extras"])
    names = ("features.dino2", "images")
    runs = {}
    for key, workers, extras in (("w0", 0, names), ("w1", 1, names), ("none", 0, ())):
        sampler = EpochBatchSampler(len(store), 4, seed=3, rank=1, world_size=2)
        with BatchLoader(store, sampler, workers=workers, prefetch=2, extras=extras) as loader:
            runs[key] = [next(loader) for _ in range(8)]  # 6 batches an epoch: crosses an epoch
        assert sampler.state_dict()["batch_in_epoch"] == 2  # consumed only
    ref = EpochBatchSampler(len(store), 4, seed=3, rank=1, world_size=2)
    for k, (a, b, c) in enumerate(zip(runs["w0"], runs["w1"], runs["none"])):
        assert isinstance(a, Batch) and list(a.extras) == list(names) and c.extras == {}
        assert torch.equal(a.x, b.x) and torch.equal(a.x, c.x) and torch.equal(a.y, b.y) and torch.equal(a.y, c.y)
        assert all(torch.equal(a.extras[n], b.extras[n]) for n in names)
        idx = ref.local_batch(*divmod(k, 6))
        want = store.load_extras(idx, names)
        assert all(torch.equal(a.extras[n], want[n]) for n in names)
    x, y, extras = next(batches(store, EpochBatchSampler(len(store), 4, seed=3), extras=["images"]))
    assert extras["images"].shape == (4, 3, SIZE, SIZE) and x.shape == (4, *store.shape)


# ----------------------------------------------------------------------------------------------- errors


def test_shards_without_extras_say_what_to_run(parts):
    store = LatentStore(parts["plain"])
    assert store.extra_names == () and store.feature_info == {}
    with pytest.raises(DataError, match=r"do not hold features\.dino \(they hold no extras\).*"
                                        r"`deltafm prepare-latents --encoder PATH`"):
        store.load_extras(torch.tensor([0]), ["features.dino"])
    sampler = EpochBatchSampler(len(store), 4, seed=0)
    with pytest.raises(DataError, match=r"images.*prepare-latents --keep-images"):
        BatchLoader(store, sampler, extras=["images"])
    with pytest.raises(ValueError, match="distinct"):
        BatchLoader(store, sampler, extras=["images", "images"])
    digits = load_dataset("digits", split="test")
    assert digits.extra_names == () and digits.load_extras(torch.tensor([0]), []) == {}
    with pytest.raises(DataError, match="pixel data carries no extras"):
        BatchLoader(digits, EpochBatchSampler(len(digits), 4, seed=0), extras=["images"])


def test_restart_with_other_encoders_is_refused_and_changes_nothing(parts, tmp_path):
    root, vae, out = str(parts["root"]), parts["vae"], tmp_path / "out"
    assert prepare(root, out, vae, "--encoder", str(parts["dino"]))[0] == 0
    before = tree_digest(out)
    for opts, key in ((["--encoder", str(parts["dino2"])], "encoders"), ([], "encoders: [{"),
                      (["--encoder", str(parts["dino"]), "--encoder-grid", "2"], "encoder_grid: [4, 4] there, [2, 2]"),
                      (["--encoder", str(parts["dino"]), "--keep-images"], "keep_images: false there, true now")):
        rc, _, err = prepare(root, out, vae, *opts)
        assert rc == 2 and err.count("error:") == 1 and "other settings" in err and key in err, err
    assert tree_digest(out) == before
    rc, _, err = prepare(root, out, vae, "--encoder", str(parts["dino"]), "--batch-size", "3")
    assert rc == 0 and tree_digest(out) == before, err  # same settings: nothing left to do


def test_bad_encoder_input_is_one_error_line(parts, tmp_path, monkeypatch):
    root, vae = str(parts["root"]), parts["vae"]
    rc, _, err = prepare(root, tmp_path / "a", vae, "--encoder", str(tmp_path / "nowhere"))
    assert rc == 2 and err.count("error:") == 1 and "no such folder" in err, err
    assert not (tmp_path / "a").exists()
    rc, _, err = prepare(root, tmp_path / "b", vae, "--encoder", str(parts["vae"]))  # a VAE, not an encoder
    assert rc == 2 and err.count("error:") == 1 and "model_type" in err, err
    rc, _, err = prepare(root, tmp_path / "c", vae, "--encoder-grid", "2")
    assert rc == 2 and "--encoder-grid goes with --encoder" in err, err
    rc, _, err = prepare(root, tmp_path / "d", vae, "--encoder", str(parts["dino"]), "--encoder", str(parts["dino"]))
    assert rc == 2 and "same name 'dino'" in err, err
    # an encoder whose tokens overflow float16: named, and no shard is written
    huge = ModuleEncoder(nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), _Transpose(), _Scale(1e6)),
                         name="huge", embed_dim=8, patch_size=4)
    monkeypatch.setattr("deltafm.prepare.features.load_encoder", lambda path, device="cpu": huge.to(device))
    rc, _, err = prepare(root, tmp_path / "e", vae, "--encoder", "anything")
    assert rc == 2 and err.count("error:") == 1 and "encoder 'huge'" in err and "float16" in err, err
    assert shards(tmp_path / "e") == []


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class _Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


# ----------------------------------------------------------------------------------------------- the format


def test_writer_extras_round_trip_and_shards_must_agree(tmp_path):
    g = torch.Generator().manual_seed(0)
    mu, y = torch.randn(7, 4, 2, 2, generator=g), torch.randint(0, 3, (7,), generator=g)
    feats, imgs = torch.randn(7, 6, 5, generator=g), torch.randint(0, 256, (7, 3, 4, 4), generator=g).to(torch.uint8)
    meta = feature_metadata("e", "enc:0123", (2, 3), 5)
    write_latent_shards(tmp_path / "a", mu, y, shard_size=3, metadata=meta, num_classes=3,
                        extras={"features.e": feats, "images": imgs})
    store = LatentStore(tmp_path / "a")
    assert store.feature_info["e"]["grid"] == (2, 3) and store.feature_info["e"]["tokens"] == 6
    got = store.load_extras(torch.tensor([6, 1, 3]), ["features.e", "images"])
    assert torch.equal(got["features.e"], feats[[6, 1, 3]].half().float())
    assert torch.equal(got["images"], imgs[[6, 1, 3]])
    with pytest.raises(ValueError, match=r"metadata needs"):
        write_latent_shards(tmp_path / "b", mu, y, extras={"features.e": feats})
    with pytest.raises(ValueError, match=r"encoder enc:0123 are NaN or inf in float16"):
        write_latent_shards(tmp_path / "c", mu, y, metadata=meta, extras={"features.e": feats * 1e5})
    with pytest.raises(ValueError, match=r"disagree with grid 2,3"):
        write_latent_shards(tmp_path / "d", mu, y, metadata=meta, extras={"features.e": feats[:, :4]})
    # shards that differ in the extras they hold, or in the encoder, do not mix
    write_latent_shards(tmp_path / "mix", mu, y, prefix="a", metadata=meta, extras={"features.e": feats})
    write_latent_shards(tmp_path / "mix", mu, y, prefix="b")
    with pytest.raises(DataError, match=r"b-00000\.safetensors: extras \{\} differs"):
        LatentStore(tmp_path / "mix")
    other = feature_metadata("e", "enc:ffff", (2, 3), 5)
    write_latent_shards(tmp_path / "two", mu, y, prefix="a", metadata=meta, extras={"features.e": feats})
    write_latent_shards(tmp_path / "two", mu, y, prefix="b", metadata=other, extras={"features.e": feats})
    with pytest.raises(DataError, match=r"metadata features\.e\.identity='enc:ffff' differs"):
        LatentStore(tmp_path / "two")


def test_a_prepare_json_from_before_the_repa_options_still_resumes(tmp_path):
    from deltafm.prepare.store import DEFAULTS, SETTINGS_FILE, OutFolder

    old = {"format": "deltafm.prepare-latents", "version": 1, "images": 3}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(old))
    assert OutFolder(tmp_path, {**old, **DEFAULTS}, 1).differences() == []
    assert OutFolder(tmp_path, {**old, **DEFAULTS, "keep_images": True}, 1).differences() == [
        "keep_images: false there, true now"]
