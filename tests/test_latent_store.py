"""The lazy latent path: LatentStore (pread from shards, posterior draws, value checks) and BatchLoader
(workers, prefetch, the saved position), down to a latent training run with a std that resumes bit-exactly.
All fast (a few seconds)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltafm.data import (
    Batch,
    BatchLoader,
    DataError,
    EpochBatchSampler,
    LatentStore,
    batch_generator,
    load_dataset,
    load_latent_shards,
    write_latent_shards,
)
from deltafm.data.latent_format import read_latent_moments, shard_metadata
from deltafm.train.checkpoint import load_checkpoint
from deltafm.train.config import ConfigError
from test_train import _cfg, _records, _train, _weights

SHAPE = (4, 4, 4)


def _moments(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw posterior means (VAE-like scale), stds in [0.05, 0.55) and labels of n items."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, *SHAPE, generator=g) * 4 + 1
    std = torch.rand(n, *SHAPE, generator=g) * 0.5 + 0.05
    return mu, std, torch.arange(n) % 3


def _write(root: Path, n: int = 10, shard_size: int = 4, std: bool = True, dtype: torch.dtype = torch.float16,
           **kw) -> Path:
    mu, sd, y = _moments(n)
    write_latent_shards(root, mu, y, shard_size=shard_size, scale_factor=0.5, shift_factor=0.25, num_classes=3,
                        dtype=dtype, std=sd if std else None, metadata={"vae": "test-vae"}, **kw)
    return root


def _raw_shard(path: Path, mu: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, **meta: str) -> None:
    """A shard written without the writer's value checks (to hold values the writer refuses)."""
    tensors = {"latents": mu.half(), "latents_std": std.half(), "labels": labels}
    save_file(tensors, str(path), metadata=shard_metadata(0.5, 0.25, 3, meta or None))


# ------------------------------------------------------------------------------------------ the store


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_store_gives_the_in_memory_loaders_means_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    root = _write(tmp_path / "lat", n=10, dtype=dtype)
    store, mem = load_dataset("latents", root), load_latent_shards(root)
    assert isinstance(store, LatentStore) and not hasattr(store, "images")
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(store.load_batch(idx), mem.images[idx])  # μ in model space, bit for bit
    assert torch.equal(store.load_batch(idx, dtype=torch.float16), mem.images[idx].half())
    assert torch.equal(store.labels, mem.labels) and store.labels.dtype == torch.int64
    for attr in ("num_classes", "kind", "class_names", "channels", "image_size", "shape", "latent_scale",
                 "latent_shift", "meta"):
        assert getattr(store, attr) == getattr(mem, attr), attr
    assert store.meta == {"vae": "test-vae"} and len(store) == 10 and store.has_std
    assert torch.equal(store.class_counts(), torch.tensor([4, 3, 3]))
    x, y = store[7]
    assert torch.equal(x, mem.images[7]) and int(y) == 1
    assert torch.equal(store.from_model(x), mem.from_model(mem.images[7]))
    # a copy for another process reads the same, with descriptors of its own
    assert store._fds
    copy = pickle.loads(pickle.dumps(store))
    assert copy._fds == {} and torch.equal(copy.load_batch(idx), mem.images[idx])


def test_posterior_draw_is_mu_plus_sigma_eps_by_hand(tmp_path: Path) -> None:
    root = _write(tmp_path / "lat", n=10)
    store = LatentStore(root)
    parts = [read_latent_moments(p) for p in store.paths]
    mu = torch.cat([p[0] for p in parts]).float()
    sd = torch.cat([p[1] for p in parts]).float()
    idx = torch.tensor([9, 2, 5, 4, 0])
    eps = torch.randn((5, *SHAPE), generator=torch.Generator().manual_seed(123), dtype=torch.float32)
    want = ((mu[idx] + sd[idx] * eps) - 0.25) * 0.5
    got = store.load_batch(idx, torch.Generator().manual_seed(123))
    assert torch.equal(got, want)
    assert not torch.equal(store.load_batch(idx, torch.Generator().manual_seed(124)), want)
    assert torch.equal(store.load_batch(idx), (mu[idx] - 0.25) * 0.5)  # no generator: the mean


def test_reads_group_consecutive_items_per_shard(tmp_path: Path, monkeypatch) -> None:
    root = _write(tmp_path / "lat", n=10, shard_size=4)  # shards: items 0-3, 4-7, 8-9
    store, mem = LatentStore(root), load_latent_shards(root)
    calls: list[tuple[str, int, int]] = []
    real = os.preadv

    def counting(fd: int, buffers: list, offset: int) -> int:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    item = 4 * 4 * 4 * 2  # float16 bytes per item
    idx = torch.tensor([8, 3, 5, 2, 7, 4, 6])  # runs: shard 0 items 2-3, shard 1 items 0-3, shard 2 item 0
    assert torch.equal(store.load_batch(idx), mem.images[idx])
    assert [(Path(f).name, n) for f, _, n in calls] == [
        ("shard-00000.safetensors", 2 * item), ("shard-00001.safetensors", 4 * item),
        ("shard-00002.safetensors", 1 * item)]
    calls.clear()
    assert store.load_batch(idx, torch.Generator()).shape == mem.images[idx].shape
    assert len(calls) == 6  # the same three runs, for μ and for σ
    calls.clear()
    store.load_batch(torch.tensor([0, 2, 2]))  # a gap and a repeat: three reads of one item
    assert [n for _, _, n in calls] == [item] * 3
    assert calls[1][1] - calls[0][1] == 2 * item and calls[2][1] == calls[1][1]


def test_max_items_and_subsets(tmp_path: Path) -> None:
    root = _write(tmp_path / "lat", n=10)
    mem = load_latent_shards(root)
    first = load_dataset("latents", root, max_items=6)
    assert len(first) == 6 and torch.equal(first.labels, mem.labels[:6])
    assert torch.equal(first.load_batch(torch.arange(6).flip(0)), mem.images[:6].flip(0))
    with pytest.raises(IndexError):
        first.load_batch(torch.tensor([6]))
    picked = first.subset(torch.tensor([5, 1])).subset(slice(1, 2))  # a subset of a subset
    assert len(picked) == 1 and torch.equal(picked.load_batch(torch.tensor([0])), mem.images[[1]])
    assert torch.equal(picked.labels, mem.labels[[1]])


def test_bad_values_in_a_later_shard_are_a_data_error_at_read(tmp_path: Path) -> None:
    mu, sd, y = _moments(8)
    root = tmp_path / "lat"
    root.mkdir()
    bad_mu, bad_sd = mu.clone(), sd.clone()
    bad_mu[5, 1, 0, 3] = float("nan")
    bad_sd[6, 0, 0, 0] = -0.5
    _raw_shard(root / "shard-00000.safetensors", mu[:4], sd[:4], y[:4])
    _raw_shard(root / "shard-00001.safetensors", bad_mu[4:], bad_sd[4:], y[4:])
    store = LatentStore(root)  # opening reads headers and labels only
    assert store.load_batch(torch.tensor([0, 3, 4])).shape == (3, *SHAPE)
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: .*latents hold NaN or inf \(first at item 1\)"):
        store.load_batch(torch.tensor([2, 5]))
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: .*latents_std hold .*negative.*item 2\)"):
        store.load_batch(torch.tensor([6, 0]), torch.Generator())
    # through the loader: the same error, raised as such (not as a worker traceback)
    sampler = EpochBatchSampler(8, 8, seed=0)
    for workers in (0, 1):
        with BatchLoader(store, sampler, workers=workers) as loader, pytest.raises(DataError, match="shard-00001"):
            next(loader)
    assert sampler.state_dict()["batch_in_epoch"] == 0  # a failed batch is not consumed


def test_shards_of_two_vaes_do_not_mix(tmp_path: Path) -> None:
    mu, sd, y = _moments(4)
    write_latent_shards(tmp_path / "lat", mu, y, prefix="a", std=sd, metadata={"vae": "sd-vae-ft-ema"})
    write_latent_shards(tmp_path / "lat", mu, y, prefix="b", std=sd, metadata={"vae": "sd-vae-ft-mse"})
    with pytest.raises(DataError, match=r"b-00000\.safetensors: VAE='sd-vae-ft-mse' differs"):
        load_dataset("latents", tmp_path / "lat")
    write_latent_shards(tmp_path / "mix", mu, y, prefix="a", std=sd)
    write_latent_shards(tmp_path / "mix", mu, y, prefix="b")
    with pytest.raises(DataError, match="'latents_std' present"):
        LatentStore(tmp_path / "mix")


def test_image_datasets_share_the_batch_method() -> None:
    ds = load_dataset("digits", split="test")
    idx = torch.tensor([5, 0, 17])
    assert torch.equal(ds.load_batch(idx, torch.Generator()), ds.images[idx].float() / 127.5 - 1)


# ----------------------------------------------------------------------------------------- the loader


def _take(loader: BatchLoader, k: int) -> list[Batch]:
    return [next(loader) for _ in range(k)]


def test_workers_give_the_same_batches_and_draws(tmp_path: Path) -> None:
    store = LatentStore(_write(tmp_path / "lat", n=22, shard_size=5))
    steps = 13  # 5 global batches of 4 (2 per rank) an epoch: crosses two epoch boundaries
    runs = {}
    for workers in (0, 2):
        sampler = EpochBatchSampler(22, 4, seed=3, rank=1, world_size=2)
        with BatchLoader(store, sampler, workers=workers, prefetch=2) as loader:
            runs[workers] = _take(loader, steps)
        assert sampler.state_dict()["epoch"] == 2 and sampler.state_dict()["batch_in_epoch"] == 3
    for (x0, y0, e0), (x2, y2, e2) in zip(runs[0], runs[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and e0 == e2 == {}
    # batch 2 of epoch 1 (the 8th batch), by hand: rank 1's half of the global batch, its own generator
    ref = EpochBatchSampler(22, 4, seed=3, rank=1, world_size=2)
    idx = ref.local_batch(1, 2)
    assert torch.equal(runs[0][7][0], store.load_batch(idx, batch_generator(3, 1, 1, 2)))
    assert torch.equal(runs[0][7][1], store.labels[idx])
    assert not torch.equal(runs[0][7][0], store.load_batch(idx))  # the std is drawn from


def test_prefetch_does_not_advance_the_saved_position(tmp_path: Path) -> None:
    store = LatentStore(_write(tmp_path / "lat", n=20, shard_size=6))
    sampler = EpochBatchSampler(20, 4, seed=5)
    with BatchLoader(store, sampler, workers=2, prefetch=2) as loader:
        first = _take(loader, 3)
        state = sampler.state_dict()
        assert state["epoch"] == 0 and state["batch_in_epoch"] == 3  # consumed, not loaded
        assert loader.issued == 3 + 2 * 2  # ... while workers x prefetch more were handed out
        more = _take(loader, 6)
    resumed = EpochBatchSampler(20, 4, seed=0)
    resumed.load_state_dict(state)
    with BatchLoader(store, resumed, workers=0) as again:
        for (xa, ya, _), (xb, yb, _) in zip(more, _take(again, 6)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(first) == 3


def test_loader_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="data.workers"):
        _cfg("data.workers=-1")
    with pytest.raises(ConfigError, match="data.prefetch"):
        _cfg("data.prefetch=0")


# --------------------------------------------------------------------------------- training end to end


def test_latent_training_with_std_resumes_bit_exactly(tmp_path: Path, monkeypatch) -> None:
    """A run with workers=2 dies at step 7 (its last checkpoint: step 6, with batches prefetched beyond
    it); resumed, it ends bit-identical to an uninterrupted run that loads with workers=0."""
    root = _write(tmp_path / "lat", n=80, shard_size=30, std=True)
    base = ("model.name=SiT-N/2", "data.name=latents", f"data.root={root}", "train.batch_size=16",
            "train.steps=8", "train.ckpt_every=3", "log.every=1", "sample.every=-1")
    ref = _train(_cfg(*base, "data.workers=0"), tmp_path / "ref")
    assert ref.step == 8

    import deltafm.train.loop as loop

    real, calls = loop.train_step, {"n": 0}

    def dies_at_step_7(run, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("killed")
        return real(run, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dies_at_step_7)
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="killed"):
        _train(_cfg(*base, "data.workers=2", "data.prefetch=3"), cut)
    monkeypatch.undo()
    saved = load_checkpoint(cut / "checkpoints" / "step_00000006").state["sampler"]
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 1)  # 5 batches an epoch; 6 consumed
    done = _train(_cfg(*base, "data.workers=2"), cut, resume="auto")
    assert done.step == 8
    a, b = ref.checkpoint, done.checkpoint
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = _weights(a, "ema"), _weights(b, "ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    la = {r["step"]: r["loss"] for r in _records(tmp_path / "ref")}
    lb = {r["step"]: r["loss"] for r in _records(cut)}
    assert la == lb and sorted(la) == list(range(1, 9))
