"""Tests of deltafm.data: IDX files, digits, image folders, latent shards, the registry, normalisation and the
resumable batch sampler. All fast (the real Fashion-MNIST load is about 1.5 s)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deltafm.data import (
    DATASETS,
    EpochBatchSampler,
    IdxFormatError,
    ImageDataset,
    batches,
    epoch_seed,
    load_dataset,
    load_idx_dataset,
    model_to_uint8,
    read_idx,
    uint8_to_model,
    write_idx,
)
from deltafm.data.digits import load_digits_dataset
from deltafm.data.folder import load_image_folder
from deltafm.data.idx import FASHION_MNIST_ROOT, find_idx_files, parse_idx
from deltafm.data.latents import LatentShardWriter, load_latent_shards, read_latent_shard, write_latent_shards

# ----------------------------------------------------------------------------------------------- IDX


def test_parse_idx_hand_built_bytes() -> None:
    """The reader follows the format spec on bytes written by hand (independent of our writer)."""
    raw = b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    np.testing.assert_array_equal(parse_idx(raw), np.arange(6, dtype=np.uint8).reshape(2, 3))
    raw16 = b"\x00\x00\x0b\x01" + (2).to_bytes(4, "big") + b"\x01\x00\xff\xfe"  # big-endian 256, -2
    out = parse_idx(raw16)
    assert out.dtype == np.int16 and out.dtype.isnative
    assert out.tolist() == [256, -2]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, compress: bool, dtype: type) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((5, 4, 3)) * 100).astype(dtype)
    path = write_idx(tmp_path / "a-idx3-ubyte", arr, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_idx_compression_detected_by_magic_not_name(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    gz_without_suffix = write_idx(tmp_path / "images", arr, compress=True)
    plain_with_suffix = write_idx(tmp_path / "images.gz", arr, compress=False)
    np.testing.assert_array_equal(read_idx(gz_without_suffix), arr)
    np.testing.assert_array_equal(read_idx(plain_with_suffix), arr)


def _good_bytes() -> bytes:
    return b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes([1, 2, 3, 4])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00" + _good_bytes()[2:], "magic"),
        (b"\x00\x00\x07\x01" + _good_bytes()[4:], "dtype code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03" + (4).to_bytes(4, "big"), "truncated header"),
        (_good_bytes()[:-1], "truncated"),
        (_good_bytes() + b"\x00", "trailing bytes"),
    ],
)
def test_idx_corrupt_files_raise_clear_errors(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(IdxFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    # The same content gzipped fails the same way.
    gz = tmp_path / "bad.gz"
    gz.write_bytes(gzip.compress(raw))
    with pytest.raises(IdxFormatError, match=message):
        read_idx(gz)


def test_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    good = gzip.compress(_good_bytes() * 50)
    path = tmp_path / "cut.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(path)


def _write_idx_dataset(root: Path, n_train: int = 7, n_test: int = 3, gz: bool = True) -> dict:
    rng = np.random.default_rng(1)
    data = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 5, 5), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        labels[0] = 9  # so max(label) + 1 == 10
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        data[split] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dataset(tmp_path: Path, gz: bool) -> None:
    data = _write_idx_dataset(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = load_idx_dataset(tmp_path, split)
        images, labels = data[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 1, 5, 5)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
        assert ds.num_classes == 10 and ds.channels == 1 and ds.image_size == 5
    # The registry reads any folder for "mnist".
    assert torch.equal(load_dataset("mnist", tmp_path, "test").images, load_idx_dataset(tmp_path, "test").images)


def test_idx_dataset_count_mismatch(tmp_path: Path) -> None:
    _write_idx_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(6, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="7 images but .* 6 labels"):
        load_idx_dataset(tmp_path, "train")


def test_idx_missing_folder_and_files_name_expected_files(tmp_path: Path) -> None:
    expected = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    with pytest.raises(FileNotFoundError) as info:
        load_idx_dataset(tmp_path / "nowhere")
    msg = str(info.value)
    assert all(name in msg for name in expected)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root=DIR" in msg
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        find_idx_files(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("fashion-mnist", root=tmp_path / "nowhere")


def _fashion_root() -> Path:
    """The Fashion-MNIST folder; missing files fail the test under CI=true and skip it elsewhere."""
    try:
        find_idx_files(FASHION_MNIST_ROOT, "train")
        find_idx_files(FASHION_MNIST_ROOT, "test")
    except FileNotFoundError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Fashion-MNIST must be installed in CI (apt-get install dataset-fashion-mnist): {err}")
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    return FASHION_MNIST_ROOT


def test_fashion_mnist_real_files() -> None:
    fashion_root = _fashion_root()
    train_images, _ = find_idx_files(fashion_root, "train")
    assert read_idx(train_images).shape == (60000, 28, 28)
    test_images, test_labels = find_idx_files(fashion_root, "test")
    assert read_idx(test_images).shape == (10000, 28, 28)
    assert read_idx(test_labels).shape == (10000,)
    train = load_dataset("fashion-mnist", split="train")
    test = load_dataset("fashion-mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.num_classes == test.num_classes == 10 and len(train.class_names) == 10
    # Fashion-MNIST is balanced: 6000 train and 1000 test items per class.
    assert train.class_counts().tolist() == [6000] * 10
    assert test.class_counts().tolist() == [1000] * 10
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255


# ---------------------------------------------------------------------------------------------- digits


def test_digits() -> None:
    from sklearn.datasets import load_digits

    everything = load_dataset("digits", split="all")
    assert len(everything) == 1797 and everything.shape == (1, 8, 8) and everything.num_classes == 10
    raw = load_digits()
    expected = np.rint(raw.images * 255 / 16).astype(np.uint8)
    assert torch.equal(everything.images[:, 0], torch.from_numpy(expected))
    assert torch.equal(everything.labels, torch.from_numpy(raw.target.astype(np.int64)))
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    # Deterministic split: test = items 0, 5, 10, ...; train = the rest, in order.
    assert torch.equal(test.images, everything.images[::5])
    keep = torch.arange(1797) % 5 != 0
    assert torch.equal(train.labels, everything.labels[keep])
    assert set(test.labels.tolist()) == set(range(10))


# ---------------------------------------------------------------------------------------------- folder


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    _png(tmp_path / "zebra" / "a.png", rgb)
    _png(tmp_path / "apple" / "x.png", np.full((4, 6, 3), 200, np.uint8))
    _png(tmp_path / "apple" / "nested" / "y.png", np.full((4, 6, 3), 50, np.uint8))
    _png(tmp_path / "apple" / ".hidden.png", np.full((4, 6, 3), 7, np.uint8))
    (tmp_path / "apple" / "notes.txt").write_text("not an image")

    ds = load_image_folder(tmp_path)
    assert ds.class_names == ("apple", "zebra") and ds.num_classes == 2
    assert ds.images.shape == (3, 3, 4, 6) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 1]  # apple/nested/y.png, apple/x.png, zebra/a.png
    assert ds.images[0].unique().tolist() == [50] and ds.images[1].unique().tolist() == [200]
    assert ds.images[2, :, 0, 0].tolist() == [10, 20, 30]
    gray = load_image_folder(tmp_path, channels=1)
    assert gray.images.shape == (3, 1, 4, 6)
    assert gray.images[1].unique().tolist() == [200]


def test_image_folder_resize_and_center_crop(tmp_path: Path) -> None:
    # 8 wide, 4 high: left half black, right half white. Shorter side is already 4, so no resize: the
    # center crop keeps columns 2..5.
    half = np.zeros((4, 8), np.uint8)
    half[:, 4:] = 255
    _png(tmp_path / "c" / "half.png", half)
    ds = load_image_folder(tmp_path, image_size=4, channels=1)
    assert ds.images.shape == (1, 1, 4, 4)
    assert ds.images[0, 0].tolist() == [[0, 0, 255, 255]] * 4
    # A uniform image stays uniform through the bicubic resize (16x12 -> 5x5 after crop).
    _png(tmp_path / "d" / "flat.png", np.full((12, 16), 77, np.uint8))
    ds = load_dataset("folder", tmp_path, image_size=5, channels=1)
    assert ds.images.shape == (2, 1, 5, 5) and ds.image_size == 5
    assert ds.images[1].unique().tolist() == [77]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "none")
    _png(tmp_path / "a" / "small.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "b" / "big.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(ValueError, match="pass image_size"):
        load_image_folder(tmp_path, channels=1)
    assert load_image_folder(tmp_path, image_size=4, channels=1).images.shape == (2, 1, 4, 4)
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path, image_size=4)


# --------------------------------------------------------------------------------------------- latents


def _dyadic_latents(n: int, shape: tuple[int, int, int] = (4, 2, 2), seed: int = 0) -> torch.Tensor:
    """Latents that are multiples of 1/64 in [-2, 2]: exact in float16, and (z - 0.25) * 0.5 is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 129, (n, *shape), generator=g).float() / 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_latent_shards_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    z = _dyadic_latents(8)
    y = torch.arange(8) % 3
    paths = write_latent_shards(
        tmp_path, z, y, shard_size=3, scale_factor=0.5, shift_factor=0.25, num_classes=5, dtype=dtype,
        metadata={"vae": "test"},
    )  # fmt: skip
    assert [p.name for p in paths] == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    sizes = [read_latent_shard(p)[0].shape[0] for p in paths]
    assert sizes == [3, 3, 2]
    raw, labels, meta = read_latent_shard(paths[0])
    assert raw.dtype == dtype and torch.equal(raw.float(), z[:3]) and torch.equal(labels, y[:3])
    assert meta["scale_factor"] == "0.5" and meta["vae"] == "test"

    ds = load_latent_shards(tmp_path)
    assert ds.kind == "latents" and ds.num_classes == 5 and ds.shape == (4, 2, 2) and ds.channels == 4
    assert ds.images.dtype == torch.float32 and torch.equal(ds.labels, y)
    assert torch.equal(ds.images, (z - 0.25) * 0.5)  # model space
    assert torch.equal(ds.from_model(ds.images), z)  # back to raw latents for the decoder
    assert torch.equal(ds.to_model(ds.images), ds.images)  # latents are not normalised again
    assert ds.meta == {"vae": "test"}
    split = tmp_path / "nested"
    write_latent_shards(split / "train", z[:2], y[:2])
    assert len(load_dataset("latents", split, "train")) == 2


def test_latent_writer_streams_in_order(tmp_path: Path) -> None:
    z = _dyadic_latents(8, seed=1)
    y = torch.arange(8)
    with LatentShardWriter(tmp_path, shard_size=3, dtype=torch.float32) as w:
        for a, b in ((0, 2), (2, 7), (7, 8)):
            w.add(z[a:b], y[a:b])
    assert [read_latent_shard(p)[0].shape[0] for p in w.paths] == [3, 3, 2]
    ds = load_latent_shards(tmp_path)
    assert torch.equal(ds.images, z) and torch.equal(ds.labels, y) and ds.num_classes == 8
    with pytest.raises(FileExistsError, match="overwrite"):
        LatentShardWriter(tmp_path)
    w2 = LatentShardWriter(tmp_path, shard_size=3, overwrite=True)
    with pytest.raises(ValueError, match="labels must be"):
        w2.add(z[:2], y[:3])
    w2.add(z[:2], y[:2])
    with pytest.raises(ValueError, match="item shape"):
        w2.add(torch.zeros(1, 4, 3, 3), torch.zeros(1, dtype=torch.long))


def test_latent_shards_must_agree(tmp_path: Path) -> None:
    write_latent_shards(tmp_path / "s", _dyadic_latents(2), torch.zeros(2, dtype=torch.long), prefix="a")
    write_latent_shards(tmp_path / "s", _dyadic_latents(2, (4, 3, 3)), torch.zeros(2, dtype=torch.long), prefix="b")
    with pytest.raises(ValueError, match="item shape"):
        load_latent_shards(tmp_path / "s")
    z, y = _dyadic_latents(2), torch.zeros(2, dtype=torch.long)
    write_latent_shards(tmp_path / "t", z, y, prefix="a", scale_factor=0.18215)
    write_latent_shards(tmp_path / "t", z, y, prefix="b", scale_factor=1.0)
    with pytest.raises(ValueError, match="scale_factor"):
        load_latent_shards(tmp_path / "t")
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_latent_shards(tmp_path / "u")
    from safetensors.torch import save_file

    save_file({"latents": z}, str(tmp_path / "v.safetensors"), metadata={"format": "deltafm.latents"})
    with pytest.raises(ValueError, match="'latents' and 'labels'"):
        load_latent_shards(tmp_path / "v.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_latent_shards(tmp_path / "empty")


def _raw_shard(path: Path, latents: torch.Tensor, labels: torch.Tensor, **meta: str) -> Path:
    """A shard written without the writer's checks (to hold values the writer refuses)."""
    from safetensors.torch import save_file

    meta = {"format": "deltafm.latents", "format_version": "1", "scale_factor": "1.0", "shift_factor": "0.0", **meta}
    save_file({"latents": latents, "labels": labels}, str(path), metadata=meta)
    return path


def test_latent_shard_values_are_checked_once_at_load(tmp_path: Path) -> None:
    from deltafm.data import DataError
    from deltafm.errors import UserError

    z, y = _dyadic_latents(4), torch.arange(4)
    write_latent_shards(tmp_path / "ok", z, y, prefix="a")
    bad = z.clone().half()  # the writer's default storage dtype, like shard a
    bad[2, 0, 1, 1] = float("nan")
    bad[3, 1, 0, 0] = float("inf")
    _raw_shard(tmp_path / "ok" / "b-00000.safetensors", bad, y)
    with pytest.raises(DataError, match=r"b-00000\.safetensors: 2 of 4 latents hold NaN or inf \(first at item 2\)"):
        load_latent_shards(tmp_path / "ok")
    with pytest.raises(ValueError, match="non-finite"):  # the writer refuses them too
        write_latent_shards(tmp_path / "w", bad, y)
    shard = _raw_shard(tmp_path / "labels.safetensors", z, torch.tensor([0, 1, 2, 7]), num_classes="4")
    with pytest.raises(DataError, match=r"labels\.safetensors: label 7 is outside 0\.\.3"):
        read_latent_shard(shard)
    shard = _raw_shard(tmp_path / "neg.safetensors", z, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(DataError, match="negative label -1"):
        read_latent_shard(shard)
    shard = _raw_shard(tmp_path / "scale.safetensors", z, y, scale_factor="nan")
    with pytest.raises(DataError, match="scale_factor='nan' must be a finite number > 0"):
        load_latent_shards(shard)
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


# ------------------------------------------------------------------------------------ registry, types


def test_registry_errors() -> None:
    from deltafm.data import DataError, IdxFormatError

    assert issubclass(IdxFormatError, DataError)
    with pytest.raises(DataError) as info:
        load_dataset("cifar-10")
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(ValueError, match="needs a root"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="only folder, webdataset, shapes, shapes-scenes do"):
        load_dataset("digits", image_size=32)
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_dataset("digits", split="valid")
    assert len(load_dataset("digits", max_items=10)) == 10


def test_image_dataset_validation() -> None:
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="labels must lie"):
        ImageDataset(images, torch.tensor([0, 1, 2]), num_classes=2, name="x")
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images.float(), torch.tensor([0, 1, 1]), num_classes=2, name="x")
    with pytest.raises(ValueError, match="not square"):
        _ = ImageDataset(torch.zeros(1, 1, 2, 3, dtype=torch.uint8), torch.tensor([0]), 1, "x").image_size


def test_normalisation_round_trip_exact() -> None:
    p = torch.arange(256, dtype=torch.uint8)
    x = uint8_to_model(p)
    assert x.dtype == torch.float32 and float(x[0]) == -1.0 and float(x[-1]) == 1.0
    assert torch.equal(x, p.float() / 127.5 - 1)
    assert torch.equal(model_to_uint8(x), p)
    assert torch.equal(model_to_uint8(uint8_to_model(p, torch.float64)), p)
    assert model_to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clipped
    with pytest.raises(TypeError):
        uint8_to_model(p.float())


# --------------------------------------------------------------------------------------------- sampler


def _take(sampler: EpochBatchSampler, n: int) -> list[torch.Tensor]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_order_is_the_documented_permutation() -> None:
    s = EpochBatchSampler(10, 4, seed=3)
    got = _take(s, 4)  # 2 batches per epoch (drop_last) -> epochs 0, 0, 1, 1
    for k, batch in enumerate(got):
        epoch, b = divmod(k, 2)
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(epoch_seed(3, epoch)))
        assert torch.equal(batch, perm[b * 4 : (b + 1) * 4])
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["batch_in_epoch"] == 2 and s.items_seen == 16


def test_sampler_deterministic_per_seed() -> None:
    a = torch.cat(_take(EpochBatchSampler(50, 5, seed=7), 25))
    b = torch.cat(_take(EpochBatchSampler(50, 5, seed=7), 25))
    c = torch.cat(_take(EpochBatchSampler(50, 5, seed=8), 25))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[:50], a[50:100]), "epochs must use different permutations"
    assert epoch_seed(0, 1) != epoch_seed(1, 0)


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_every_item_once_per_epoch(drop_last: bool) -> None:
    s = EpochBatchSampler(10, 3, seed=0, drop_last=drop_last)
    assert s.batches_per_epoch == (3 if drop_last else 4)
    for _ in range(3):  # three epochs
        epoch = torch.cat(_take(s, s.batches_per_epoch))
        if drop_last:
            assert len(epoch) == 9 and len(set(epoch.tolist())) == 9
        else:
            assert sorted(epoch.tolist()) == list(range(10))


def test_sampler_resume_mid_epoch_gives_identical_batches() -> None:
    ref = _take(EpochBatchSampler(23, 4, seed=11), 17)  # 5 batches per epoch: crosses epoch boundaries
    for k in (0, 3, 5, 7):
        s = EpochBatchSampler(23, 4, seed=11)
        first = _take(s, k)
        state = s.state_dict()
        assert set(state) >= {"epoch", "batch_in_epoch", "seed"}
        resumed = EpochBatchSampler(23, 4, seed=999)  # seed is taken from the state
        resumed.load_state_dict(state)
        rest = _take(resumed, 17 - k)
        assert all(torch.equal(x, r) for x, r in zip(first + rest, ref))


def test_sampler_ranks_partition_the_global_batch() -> None:
    ref = _take(EpochBatchSampler(40, 8, seed=5), 12)
    per_rank = [_take(EpochBatchSampler(40, 8, seed=5, rank=r, world_size=4), 12) for r in range(4)]
    for b in range(12):
        chunks = [per_rank[r][b] for r in range(4)]
        assert all(len(c) == 2 for c in chunks)
        assert torch.equal(torch.cat(chunks), ref[b])


def test_sampler_world_size_change_keeps_global_sequence() -> None:
    ref = _take(EpochBatchSampler(30, 6, seed=2), 14)
    one = EpochBatchSampler(30, 6, seed=2)
    _take(one, 4)
    state = one.state_dict()
    ranks = [EpochBatchSampler(30, 6, seed=2, rank=r, world_size=3) for r in range(3)]
    for s in ranks:
        s.load_state_dict(state)
    got = [_take(s, 6) for s in ranks]
    for b in range(6):
        assert torch.equal(torch.cat([got[r][b] for r in range(3)]), ref[4 + b])
    state2 = ranks[0].state_dict()  # 10 global batches done, back to one process
    back = EpochBatchSampler(30, 6, seed=2)
    back.load_state_dict(state2)
    assert all(torch.equal(x, r) for x, r in zip(_take(back, 4), ref[10:]))


def test_sampler_rejects_bad_configs_and_states() -> None:
    with pytest.raises(ValueError, match="divisible"):
        EpochBatchSampler(10, 5, seed=0, world_size=2)
    with pytest.raises(ValueError, match="no batch"):
        EpochBatchSampler(3, 4, seed=0)
    state = EpochBatchSampler(10, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatchSampler(10, 5, seed=0).load_state_dict(state)


def test_batches_gathers_normalised_items() -> None:
    ds = load_dataset("digits", split="test")
    sampler = EpochBatchSampler(len(ds), 32, seed=0)
    ref = EpochBatchSampler(len(ds), 32, seed=0)
    it, rit = batches(ds, sampler, device="cpu"), iter(ref)
    for _ in range(3):
        x, y, extras = next(it)
        idx = next(rit)
        assert extras == {}
        assert x.dtype == torch.float32 and x.shape == (32, 1, 8, 8)
        assert torch.equal(x, ds.images[idx].float() / 127.5 - 1) and torch.equal(y, ds.labels[idx])
    with pytest.raises(ValueError, match="sampler is for"):
        next(batches(ds, EpochBatchSampler(len(ds) + 1, 4, seed=0)))
