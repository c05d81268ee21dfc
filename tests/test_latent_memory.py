"""The lazy latent path keeps a rank's memory bounded on a latent set larger than that bound (slow).

The bound (also in docs/DATA.md, "Lazy latents"): a training process's peak resident set size (RSS) stays
below

    cap = baseline + 400 MB,   baseline = peak RSS after importing torch, opening the LatentStore,
                                          building the model and one forward/backward of the objective on
                                          a random batch of the training batch size (model + activations)

whatever the size of the latent set on disk, since items are read per batch with ``pread`` (bytes land in
the kernel's page cache, which is not RSS) and only labels (8 bytes an item) stay in memory. The 400 MB
cover the optimizer, the EMA, a few batches in flight and allocator slack; the data adds a few tens of MB.

The test writes 73 728 items of 4x32x32 float16 latents **with** their std (16 KiB an item: 1.21 GB on
disk in 12 shards, the SD-VAE latent size of 256x256 images), then in a subprocess (torch threads 1):
takes the baseline with SiT-N/8 at batch 256, reads one full epoch through the BatchLoader (every item
read, z = μ + σ·ε drawn) and trains 12 steps of batch 256 with ``data.workers=2`` (every batch touches
all 12 shards). It asserts the subprocess's peak RSS (``VmHWM`` of /proc/self/status: its ``ru_maxrss``
would also count the forking pytest process's peak, which Linux keeps across ``execve``) and that of each
loader worker (``ru_maxrss`` of its joined children) stay under the cap, that the data on disk is larger
than the cap, and that the in-memory loader would not fit: it holds the whole set as float32 in model
space, 73 728 · 4·32·32 · 4 B = 1.21 GB > 400 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltafm.data import LatentShardWriter

ROOT = Path(__file__).resolve().parents[1]
ITEMS, SHARD, SHAPE = 73_728, 6_144, (4, 32, 32)
HEADROOM_MB = 400

CHILD = r"""
import json, resource, sys
import torch
from deltafm.data import BatchLoader, EpochBatchSampler, load_dataset
from deltafm.train.builders import build_model_for, build_objective, data_info
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train

root, out = sys.argv[1], sys.argv[2]


def peak_mb():
    # VmHWM: the peak RSS of this process's own memory since exec (ru_maxrss would also hold the forking
    # parent's peak: Linux keeps it across execve)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024


cfg = load_config(find_preset("digits-tiny"), [
    "model.name=SiT-N/8", "data.name=latents", f"data.root={root}", "data.workers=2", "data.prefetch=2",
    "train.batch_size=256", "train.steps=12", "train.ckpt_every=1000", "train.threads=1", "sample.every=-1",
    "log.progress_bar=false", "log.tensorboard=false", "log.every=4"])
ds = load_dataset("latents", root)
model = build_model_for(cfg, data_info(ds))
objective = build_objective(cfg, ds.num_classes)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(256, *ds.shape, generator=g), torch.randint(0, ds.num_classes, (256,), generator=g)
objective(model, x, y, generator=g).loss.backward()  # the model's own memory: weights, activations, grads
del x, y
base = peak_mb()
sampler = EpochBatchSampler(len(ds), 256, seed=0)
with BatchLoader(ds, sampler, workers=0) as loader:
    seen = sum(next(loader)[0].shape[0] for _ in range(sampler.batches_per_epoch))
epoch = peak_mb()
res = train(cfg, out)
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the joined loader workers (KiB)
print(json.dumps(dict(base=base, epoch=epoch, peak=peak_mb(), workers=workers,
                      seen=seen, steps=res.step, images=res.images_seen)))
"""


def _write_set(root: Path) -> int:
    """ITEMS items with std, shard by shard (one shard of data in this process at a time); bytes on disk."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(SHARD, *SHAPE, generator=g) * 4
    std = torch.rand(SHARD, *SHAPE, generator=g) * 0.5
    with LatentShardWriter(root, shard_size=SHARD, scale_factor=0.18215, num_classes=10,
                           metadata={"vae": "memory-test"}) as w:
        for k in range(ITEMS // SHARD):
            w.add(mu + 0.01 * k, (torch.arange(SHARD) + k) % 10, std=std)
    return sum(p.stat().st_size for p in w.paths)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_on_a_latent_set_larger_than_the_cap_stays_under_it(tmp_path: Path) -> None:
    on_disk = _write_set(tmp_path / "lat")
    item_bytes = 2 * 2 * SHAPE[0] * SHAPE[1] * SHAPE[2]  # float16 μ and σ
    assert on_disk >= ITEMS * item_bytes == 1_207_959_552
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "lat"), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    cap = r["base"] + HEADROOM_MB
    print(f"\nRSS MB: baseline {r['base']:.0f}, after a full epoch {r['epoch']:.0f}, peak {r['peak']:.0f}, "
          f"loader workers {r['workers']:.0f}; cap {cap:.0f}; data on disk {on_disk / 2**20:.0f} MB")
    assert r["seen"] == ITEMS and r["steps"] == 12 and r["images"] == 12 * 256
    assert on_disk / 2**20 > cap  # the set is larger than the bound ...
    assert r["peak"] < cap  # ... and the training process stays under it
    assert r["workers"] < cap
    in_memory_mb = ITEMS * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4 / 2**20  # load_latent_shards: float32, all of it
    assert r["base"] + in_memory_mb > cap
