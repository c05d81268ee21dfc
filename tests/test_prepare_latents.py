"""``deltafm prepare-latents``: images -> VAE latent shards, checked against an independent computation.

A tiny random ``diffusers.AutoencoderKL`` (downsampling 2) encodes generated PNG / JPEG images of mixed
sizes. The shards must hold exactly (float32 storage) the encoder's moments of the ADM-cropped images,
computed here without the package's crop, layout or reader; tar input must give the same tensors as the
folder holding the same images; a stopped run must resume to the same shards without rewriting finished
ones; bad input must stop with one ``error:`` line naming the problem.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_cases import run_cli, tree_digest
from deltafm.data.crop import adm_center_crop, crop_to_array
from deltafm.data.image_sources import ImageSourceError, expand_braces, open_source
from deltafm.data.latent_format import read_latent_moments
from deltafm.data.latents import load_latent_shards
from deltafm.prepare.encode import STOP_ENV, Layout
from deltafm.vae.autoencoder import load_autoencoder

SIZE = 16  # crop side; the VAE halves it: latents 4 x 8 x 8
CLASSES = ("n01440764", "n01443537", "n01484850")
#: (width, height) per image of a class: smaller than the crop, exactly it, >= 2x (BOX halvings), odd shapes
SHAPES = [(16, 16), (9, 12), (40, 33), (70, 64), (23, 17), (12, 30), (33, 19)]


# ----------------------------------------------------------------------------------------------- helpers


def make_vae(folder: Path, in_channels: int = 3, seed: int = 0) -> Path:
    """A tiny random AutoencoderKL (2 blocks: downsampling 2, 4 latent channels) saved in ``folder``."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=in_channels, out_channels=in_channels,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                            sample_size=SIZE)
    vae.save_pretrained(folder)
    return folder


def make_image_tree(root: Path, per_class: int = 4, seed: int = 0) -> list[tuple[Path, int]]:
    """``root/train/<wnid>/...`` with random-noise images; returns (file, class id) in enumeration order
    (classes sorted, files by path inside the class). Covers RGB, grayscale, RGBA, a JPEG and a nested folder."""
    rng = np.random.default_rng(seed)
    out = []
    for c, wnid in enumerate(CLASSES):
        for j in range(per_class):
            w, h = SHAPES[(c * per_class + j) % len(SHAPES)]
            name = f"img_{j}.png" if j < per_class - 1 else f"sub/img_{j}.png"  # "sub/..." sorts last
            mode = ("RGB", "L", "RGBA")[(c + j) % 3]
            arr = rng.integers(0, 256, (h, w, len(mode)) if mode != "L" else (h, w), dtype=np.uint8)
            if c == 1 and j == 1:
                name, mode = "img_1.JPEG", "RGB"  # upper-case extension, lossy (decoded the same every time)
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = root / "train" / wnid / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, mode=mode).save(path)
            out.append((path, c))
    (root / "train" / CLASSES[0] / ".hidden.png").write_bytes(b"ignored")  # hidden names are skipped
    return out


def ref_crop(path: Path | bytes, size: int = SIZE, mode: str = "RGB") -> np.ndarray:
    """The ADM recipe written out again (always resizing, cropping by array slicing): uint8 (C, S, S)."""
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
        img = im.convert(mode)
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), resample=Image.BICUBIC)
    a = np.asarray(img)
    a = a[:, :, None] if a.ndim == 2 else a
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top: top + size, left: left + size].transpose(2, 0, 1)


def ref_shards(vae: Path, crops: list[np.ndarray], shard: int, batch: int, flip: bool):
    """[(μ, σ)] per shard: items (each crop, then its mirror when flipping) in shards of ``shard``, encoded in
    batches of ``batch`` from each shard's start, by the VAE called directly."""
    ae = load_autoencoder(vae)
    items = [v for a in crops for v in ([a, a[:, :, ::-1]] if flip else [a])]
    out = []
    for s0 in range(0, len(items), shard):
        mus, sds = [], []
        for b0 in range(s0, min(s0 + shard, len(items)), batch):
            x = torch.from_numpy(np.stack(items[b0: min(b0 + batch, s0 + shard)]).copy()).float() / 127.5 - 1
            mu, sd = ae.encode_moments(x)
            mus.append(mu)
            sds.append(sd)
        out.append((torch.cat(mus), torch.cat(sds)))
    return out


def prepare(inputs: list[str] | str, out: Path, vae: Path, *opts: str) -> tuple[int, str, str]:
    inputs = [inputs] if isinstance(inputs, str) else inputs
    return run_cli(["prepare-latents", "--input", *inputs, "--out", str(out), "--vae", str(vae), "--image-size",
                    str(SIZE), "--workers", "0", "--no-progress", *opts])


def shard_content(path: Path) -> tuple[dict, bytes]:
    """(parsed safetensors header, tensor bytes): safetensors writes its metadata map in a random order, so
    equal shards are equal in these two, not necessarily byte for byte."""
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8: 8 + n]), b[8 + n:]


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.safetensors"))


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return make_vae(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, list[tuple[Path, int]]]:
    root = tmp_path_factory.mktemp("images") / "imagenet"
    return root, make_image_tree(root)


# ----------------------------------------------------------------------------------------------- the crop


def _blocks(h: int, w: int, k: int) -> tuple[Image.Image, np.ndarray]:
    """An image of k x k constant blocks (h x w blocks, distinct colours) and the block colours (3, h, w)."""
    vals = (np.arange(h * w * 3).reshape(3, h, w) * 11 % 256).astype(np.uint8)
    return Image.fromarray(np.kron(vals, np.ones((k, k), np.uint8)).transpose(1, 2, 0)), vals


def test_adm_crop_hand_computed_cases():
    # 16x8 of 2x2 blocks, crop 4: shorter side 8 >= 8 -> one BOX halving (exact block averages) -> 8x4,
    # shorter side 4 = crop: no resize; centre columns (8 - 4) // 2 = 2 .. 5
    img, vals = _blocks(4, 8, 2)
    assert np.array_equal(crop_to_array(img, 4), vals[:, :, 2:6])
    # 64x32 of 8x8 blocks: halved three times (32 -> 16 -> 8 >= 8 -> 4), then columns 2..5
    img, vals = _blocks(4, 8, 8)
    assert np.array_equal(crop_to_array(img, 4), vals[:, :, 2:6])
    # no resize, odd excess: 11 wide -> columns (11 - 4) // 2 = 3 .. 6; 9 tall -> rows 2 .. 5
    img, vals = _blocks(4, 11, 1)
    assert np.array_equal(crop_to_array(img, 4), vals[:, :, 3:7])
    img, vals = _blocks(9, 4, 1)
    assert np.array_equal(crop_to_array(img, 4), vals[:, 2:6, :])
    # smaller than the crop: upsampled (bicubic keeps a constant colour)
    tiny = Image.new("RGB", (2, 2), (5, 100, 250))
    assert crop_to_array(tiny, 4).reshape(3, -1).tolist() == [[5] * 16, [100] * 16, [250] * 16]
    # 10x7 -> crop 4: scale 4/7, width round(5.71) = 6 -> 6x4 bicubic, columns 1..4
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 10, 3), dtype=np.uint8))
    want = noise.resize((6, 4), resample=Image.BICUBIC).crop((1, 0, 5, 4))
    assert adm_center_crop(noise, 4).tobytes() == want.tobytes()
    # one channel: converted to L first
    assert np.array_equal(crop_to_array(noise, 4, channels=1)[0], np.asarray(adm_center_crop(noise.convert("L"), 4)))


def test_layout_batches_start_at_each_shard_start():
    lay = Layout(images=12, flip=True, shard_size=5, batch_size=2)
    assert (lay.count, lay.num_shards) == (24, 5)
    assert lay.batches(1) == [[5, 6], [7, 8], [9]] and lay.batches(4) == [[20, 21], [22, 23]]
    assert [lay.source_of(i) for i in (4, 5, 23)] == [(2, False), (2, True), (11, True)]


# ----------------------------------------------------------------------------------------------- end to end


def test_folder_shards_hold_the_moments_of_the_adm_crops(vae, tree, tmp_path):
    root, images = tree
    out = tmp_path / "out"
    rc, stdout, err = prepare(str(root), out, vae, "--flip", "--shard-size", "5", "--batch-size", "2",
                              "--storage-dtype", "float32")
    assert rc == 0, err
    refs = ref_shards(vae, [ref_crop(p) for p, _ in images], shard=5, batch=2, flip=True)
    assert [p.name for p in shards(out)] == [f"shard-{k:05d}.safetensors" for k in range(5)]  # 24 items
    labels = []
    for path, (mu, sd) in zip(shards(out), refs):
        z, s, y, meta = read_latent_moments(path)
        assert z.dtype == torch.float32 and torch.equal(z, mu) and torch.equal(s, sd)
        labels += y.tolist()
        assert (meta["vae"], meta["image_size"], meta["flip"], meta["num_classes"]) == (
            load_autoencoder(vae).identity, "16", "true", "3")
    assert labels == [c for _, c in images for _ in range(2)]
    ds = load_latent_shards(out)  # the training loader: model space (z - 0) * 0.18215
    assert torch.equal(ds.images, (torch.cat([m for m, _ in refs]) - 0.0) * 0.18215) and ds.num_classes == 3
    assert json.loads((out / "classes.json").read_text()) == list(CLASSES)
    settings = json.loads((out / "prepare.json").read_text())
    assert (settings["count"], settings["images"], settings["shard_size"], settings["flip"]) == (24, 12, 5, True)
    assert settings["input"] == str((root / "train").resolve())  # the ImageNet layout ROOT/train/<wnid>
    small = sum(min(Image.open(p).size) < SIZE for p, _ in images)
    assert small == 3 and f"{small} image(s) were smaller than 16 px" in stdout
    assert f"data.name=latents data.root={out}" in stdout and "wrote 24 latents (4×8×8, float32" in stdout


def test_one_channel_vae_reads_grayscale(tree, tmp_path):
    root, images = tree
    vae1 = make_vae(tmp_path / "vae1", in_channels=1)
    rc, _, err = prepare(str(root), tmp_path / "out", vae1, "--storage-dtype", "float32", "--batch-size", "5")
    assert rc == 0, err
    (mu, sd), = ref_shards(vae1, [ref_crop(p, mode="L") for p, _ in images], shard=10_000, batch=5, flip=False)
    z, s, _, _ = read_latent_moments(tmp_path / "out" / "shard-00000.safetensors")
    assert torch.equal(z, mu) and torch.equal(s, sd)


def _write_tars(images: list[tuple[Path, int]], folder: Path) -> list[Path]:
    """The images in two webdataset tars, in folder order: the first with .cls labels, the second with .json
    labels and some .txt captions, plus a sample without an image (ignored)."""
    folder.mkdir()
    paths = []
    for t, part in enumerate((images[:5], images[5:])):
        path = folder / f"part-{t}.tar"
        with tarfile.open(path, "w") as tf:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

            for j, (img, label) in enumerate(part):
                key = f"{t}{j:04d}"
                add(f"{key}.{img.suffix[1:].lower()}", img.read_bytes())
                if t == 0:
                    add(f"{key}.cls", f"{label}\n".encode())
                else:
                    add(f"{key}.json", json.dumps({"label": label, "w": 1}).encode())
                    if j % 2 == 0:
                        add(f"{key}.txt", f"caption {j} é".encode())
            add("zzzz.txt", b"no image")
        paths.append(path)
    return paths


def test_tar_input_gives_the_folder_input_tensors(vae, tree, tmp_path):
    root, images = tree
    opts = ["--flip", "--shard-size", "7", "--batch-size", "3", "--storage-dtype", "float32"]
    assert prepare(str(root), tmp_path / "folder", vae, *opts)[0] == 0
    tars = _write_tars(images, tmp_path / "tars")
    rc, stdout, err = prepare(f"{tars[0].parent}/part-{{0..1}}.tar", tmp_path / "tar", vae, *opts,
                              "--workers", "1")
    assert rc == 0, err
    a, b = shards(tmp_path / "folder"), shards(tmp_path / "tar")
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 4
    for pa, pb in zip(a, b):
        (za, sa, ya, ma), (zb, sb, yb, mb) = read_latent_moments(pa), read_latent_moments(pb)
        assert torch.equal(za, zb) and torch.equal(sa, sb) and torch.equal(ya, yb)
        assert ma["num_classes"] == mb["num_classes"] == "3" and ma["vae"] == mb["vae"]
        assert (ma["source"], mb["source"]) == (str((root / "train").resolve()),
                                                f"{tars[0].parent.resolve()}/part-{{0..1}}.tar")
    sides = [json.loads((tmp_path / "tar" / f"captions-{k:05d}.json").read_text()) for k in range(4)]
    names = [n for s in sides for n in s["names"]]
    assert names == [f"part-{t}.tar/{t}{j:04d}.{p.suffix[1:].lower()}"
                     for t, part in enumerate((images[:5], images[5:])) for j, (p, _) in enumerate(part) for _ in "ab"]
    captions = [c for s in sides for c in s["captions"]]
    want = [None] * 5 + [f"caption {j} é" if j % 2 == 0 else None for j in range(7)]
    assert captions == [c for c in want for _ in "ab"]
    assert [f for s in sides for f in s["flipped"]] == [False, True] * 12
    assert "captions:" in stdout and not (tmp_path / "folder" / "captions-00000.json").exists()


def test_tar_enumeration_is_the_same_for_a_pattern_a_folder_and_a_list(tree, tmp_path):
    _, images = tree
    tars = _write_tars(images, tmp_path / "tars")
    fp = [open_source(i).fingerprint() for i in ([f"{tars[0].parent}/part-{{0..1}}.tar"], [str(tars[0].parent)],
                                                  [str(t) for t in tars])]
    assert fp[0] == fp[1] == fp[2]
    src = open_source([str(tars[0].parent)], max_items=3)
    assert len(src) == 3 and src.labels.tolist() == [0, 0, 0] and src.kind == "tar"
    assert expand_braces("d/s-{000..002}.tar") == ["d/s-000.tar", "d/s-001.tar", "d/s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]


def test_a_stopped_run_resumes_to_the_same_shards_without_rewriting_finished_ones(vae, tree, tmp_path,
                                                                                   monkeypatch):
    root, _ = tree
    opts = ["--flip", "--shard-size", "5", "--batch-size", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert prepare(str(root), full, vae, *opts)[0] == 0
    monkeypatch.setenv(STOP_ENV, "2")
    with pytest.raises(RuntimeError, match="stopping after 2 shard"):
        prepare(str(root), cut, vae, *opts)
    monkeypatch.delenv(STOP_ENV)
    assert [p.name for p in shards(cut)] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    stamp = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(cut)}
    (cut / "shard-00002.safetensors.tmp").write_bytes(b"debris of a kill")
    rc, _, err = prepare(str(root), cut, vae, *opts, "--batch-size", "2")
    assert rc == 0 and "resuming: 2 of 5 shards" in err, err
    assert not (cut / "shard-00002.safetensors.tmp").exists()
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(cut)[:2]} == stamp
    assert [shard_content(p) for p in shards(cut)] == [shard_content(p) for p in shards(full)]
    # a deleted shard is encoded again, alone
    (cut / "shard-00003.safetensors").unlink()
    stamp = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(cut)}
    rc, stdout, err = prepare(str(root), cut, vae, *opts)
    assert rc == 0 and "resuming: 4 of 5 shards" in err and "(1 new)" in stdout, err
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards(cut) if p.name in stamp} == stamp
    assert [shard_content(p) for p in shards(cut)] == [shard_content(p) for p in shards(full)]


def test_other_settings_are_refused_and_change_nothing(vae, tree, tmp_path):
    root, _ = tree
    out = tmp_path / "out"
    assert prepare(str(root), out, vae, "--flip")[0] == 0
    before = tree_digest(out)
    rc, _, err = prepare(str(root), out, vae, "--image-size", "8")
    assert rc == 2 and err.count("error:") == 1
    assert "other settings (count: 24 there, 12 now; image_size: 16 there, 8 now; flip: true there, false now)" in err
    assert tree_digest(out) == before
    assert prepare(str(root), out, vae, "--flip", "--batch-size", "5")[0] == 0  # the batch size does not count


def _bad_tree(root: Path) -> list[Path]:
    """a/img_0..2 good, b/bad.png (not an image), b/cut.png (truncated PNG), b/img_0 good."""
    rng = np.random.default_rng(1)
    good = []
    for c, n in (("a", 3), ("b", 1)):
        (root / c).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(root / c / f"img_{j}.png")
            good.append(root / c / f"img_{j}.png")
    (root / "b" / "bad.png").write_bytes(b"this is not a png")
    data = (root / "a" / "img_0.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(data[: len(data) // 2])
    return good


def test_an_unreadable_image_stops_with_its_name_or_is_skipped(vae, tmp_path):
    root = tmp_path / "imgs"
    good = _bad_tree(root)
    out = tmp_path / "out"
    opts = ["--shard-size", "2", "--storage-dtype", "float32"]  # items: a0 a1 | a2 bad | cut b0
    rc, _, err = prepare(str(root), out, vae, *opts)
    bad = (root / "b" / "bad.png").resolve()
    assert rc == 2 and err.count("error:") == 1 and f"cannot read image {bad}" in err and "--skip-bad" in err, err
    assert [p.name for p in shards(out)] == ["shard-00000.safetensors"]  # finished before the bad image: kept
    rc, stdout, err = prepare(str(root), out, vae, *opts, "--skip-bad")
    assert rc == 0, err
    cut = (root / "b" / "cut.png").resolve()
    assert (out / "skipped.txt").read_text() == f"{bad}\n{cut}\n"
    assert "2 unreadable image(s) skipped" in stdout
    ds = load_latent_shards(out)
    assert ds.labels.tolist() == [0, 0, 0, 1] and [len(read_latent_moments(p)[2]) for p in shards(out)] == [2, 1, 1]
    ae = load_autoencoder(vae)
    crops = [torch.from_numpy(ref_crop(p).copy()).float() / 127.5 - 1 for p in good]
    mu = torch.cat([ae.encode_moments(torch.stack(part))[0] for part in (crops[:2], crops[2:3], crops[3:])])
    assert torch.equal(ds.images, (mu - 0.0) * 0.18215)  # shard by shard: [a0 a1] [a2] [b0]
    # with flips and shards of 3 the pair of cut.png is split over two shards: still listed once
    rc, _, err = prepare(str(root), tmp_path / "flip", vae, "--flip", "--shard-size", "3", "--skip-bad")
    assert rc == 0, err
    assert (tmp_path / "flip" / "skipped.txt").read_text() == f"{bad}\n{cut}\n"
    assert [len(read_latent_moments(p)[2]) for p in shards(tmp_path / "flip")] == [3, 3, 0, 2]  # an empty shard
    assert load_latent_shards(tmp_path / "flip").labels.tolist() == [0] * 6 + [1] * 2


# ----------------------------------------------------------------------------------------------- bad input


def test_a_folder_without_images_is_named_with_the_accepted_extensions(vae, tmp_path):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    (empty / "cats" / "notes.txt").write_text("no images here")
    rc, _, err = prepare(str(empty), tmp_path / "out", vae)
    assert rc == 2 and err.count("error:") == 1
    assert f"--input {empty.resolve()}: no images found" in err and ".png, .jpg, .jpeg" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not a vae", "channels", "image size", "out is a file"])
def test_bad_vae_or_options_stop_before_anything_is_written(vae, tree, tmp_path, case):
    root, _ = tree
    out, opts, want = tmp_path / "out", [], ""
    if case == "not a vae":
        (tmp_path / "novae").mkdir()
        vae, want = tmp_path / "novae", "is not a diffusers VAE folder: no config.json"
    elif case == "channels":
        opts, want = ["--channels", "1"], "--channels 1: the VAE takes 3-channel images"
    elif case == "image size":
        opts, want = ["--image-size", "15"], "image size 15 is not a multiple of the VAE's downsampling factor 2"
    else:
        out.write_text("a file")
        want = f"--out {out} is a file"
    rc, _, err = prepare(str(root), out, vae, *opts)
    assert rc == 2 and err.count("error:") == 1 and want in err, err
    assert not out.is_dir()


def test_a_second_writer_is_refused_while_the_folder_is_locked(vae, tree, tmp_path):
    root, _ = tree
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / "prepare.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running job's rank 0 holds
        rc, _, err = prepare(str(root), out, vae)
    finally:
        os.close(fd)
    assert rc == 2 and "another prepare-latents job is writing into" in err, err
    assert shards(out) == []
    assert prepare(str(root), out, vae)[0] == 0  # free again


def test_plain_folders_unlabelled_input_and_foreign_shards(vae, tree, tmp_path):
    root, images = tree
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, (p, _) in enumerate(images[:3]):
        (plain / f"{i}{p.suffix}").write_bytes(p.read_bytes())
    src = open_source([str(plain)])
    assert (len(src), src.num_classes, src.class_names, src.labels.tolist()) == (3, 1, None, [0, 0, 0])
    rc, _, err = prepare(str(plain), tmp_path / "out", vae)
    assert rc == 0, err
    assert read_latent_moments(tmp_path / "out" / "shard-00000.safetensors")[3]["num_classes"] == "1"
    assert not (tmp_path / "out" / "classes.json").exists()
    src = open_source([str(root)], unlabelled=True)
    assert [src.name(i) for i in range(len(src))] == [str(p.resolve()) for p, _ in images]
    assert src.labels.tolist() == [0] * len(images) and src.num_classes == 1
    (root / "train" / "loose.png").write_bytes(images[0][0].read_bytes())
    try:
        with pytest.raises(ImageSourceError, match="holds both class subfolders .* pass --unlabelled"):
            open_source([str(root)])
    finally:
        (root / "train" / "loose.png").unlink()
    with pytest.raises(ImageSourceError, match="--num-classes 2 is too small: the input has label 2"):
        open_source([str(root)], num_classes=2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.safetensors").write_bytes(b"")
    rc, _, err = prepare(str(plain), tmp_path / "other", vae)
    assert rc == 2 and "holds mine.safetensors (no prepare.json)" in err, err


def test_bad_tars_are_named(tree, tmp_path):
    _, images = tree
    tars = _write_tars(images, tmp_path / "tars")
    (tmp_path / "gz.tar").write_bytes(gzip.compress(tars[0].read_bytes()))
    with pytest.raises(ImageSourceError, match="gz.tar is a compressed tar"):
        open_source([str(tmp_path / "gz.tar")])
    with pytest.raises(ImageSourceError, match="tar file .*part-6.tar does not exist"):
        open_source([f"{tmp_path}/tars/part-{{6..7}}.tar"])
    mixed = tmp_path / "mixed.tar"
    with tarfile.open(mixed, "w") as tf:
        for name in ("a.png", "a.cls", "b.png"):
            data = images[0][0].read_bytes() if name.endswith(".png") else b"3"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageSourceError, match=r"mixed.tar:b.png has no label \(.cls or .json\)"):
        open_source([str(mixed)])
    assert open_source([str(mixed)], unlabelled=True).labels.tolist() == [0, 0]
    with tarfile.open(tmp_path / "badcls.tar", "w") as tf:
        for name, data in (("a.png", images[0][0].read_bytes()), ("a.cls", b"cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageSourceError, match=r"badcls.tar:a.cls: expected an integer >= 0, got 'cat'"):
        open_source([str(tmp_path / "badcls.tar")])


def test_a_dataset_by_name_is_encoded_in_its_own_order(tmp_path):
    """``--dataset digits``: the in-memory uint8 images, at their own size (the crop is the identity), give
    exactly the VAE's moments of the dataset's model-space images, with its labels and class names."""
    from deltafm.data import load_dataset
    from deltafm.pixels import uint8_to_model

    vae = make_vae(tmp_path / "vae", in_channels=1)
    rc, _, err = run_cli(["prepare-latents", "--dataset", "digits", "--split", "test", "--max-items", "40",
                          "--out", str(tmp_path / "out"), "--vae", str(vae), "--image-size", "8", "--workers", "0",
                          "--no-progress", "--storage-dtype", "float32", "--shard-size", "16", "--batch-size", "8",
                          "--threads", "1"])
    assert rc == 0, err
    ds = load_dataset("digits", split="test").subset(slice(0, 40))
    ae = load_autoencoder(vae)
    with torch.random.fork_rng(devices=[]):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        moments = [ae.encode_moments(uint8_to_model(ds.images[i : i + 8])) for i in range(0, 40, 8)]
        torch.set_num_threads(old)
    mu, sigma = torch.cat([m for m, _ in moments]), torch.cat([s for _, s in moments])
    got = [read_latent_moments(p) for p in shards(tmp_path / "out")]
    assert [g[0].shape[0] for g in got] == [16, 16, 8]
    assert torch.equal(torch.cat([g[0] for g in got]), mu) and torch.equal(torch.cat([g[1] for g in got]), sigma)
    assert torch.equal(torch.cat([g[2] for g in got]), ds.labels)
    rc, _, err = run_cli(["prepare-latents", "--dataset", "digits", "--input", "x", "--out", str(tmp_path / "o2"),
                          "--vae", str(vae)])
    assert rc == 2 and "not allowed with argument" in err
    rc, _, err = run_cli(["prepare-latents", "--dataset", "digits", "--unlabelled", "--out", str(tmp_path / "o3"),
                          "--vae", str(vae), "--image-size", "8"])
    assert rc == 2 and "--unlabelled goes with --input" in err and not (tmp_path / "o3").exists()
    rc, _, err = run_cli(["prepare-latents", "--input", str(tmp_path), "--split", "test", "--out",
                          str(tmp_path / "o4"), "--vae", str(vae), "--image-size", "8"])
    assert rc == 2 and "--root and --split go with --dataset" in err and not (tmp_path / "o4").exists()
