"""Distributed training: torchrun with 2 gloo processes on digits-tiny, resumed with 2 and then 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltafm.seeding import derive_seed, make_generator
from deltafm.train.checkpoint import list_checkpoints, load_checkpoint
from deltafm.train.config import find_preset, load_config
from deltafm.train.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    available_cores,
    broadcast_object,
    init_distributed,
    set_threads,
)
from deltafm.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
OPTS = ["log.progress_bar=false", "log.tensorboard=false", "log.every=1", "sample.every=-1", "train.ckpt_every=2"]


def test_seeds_differ_per_rank_and_stream_and_are_stable():
    seeds = {derive_seed(0, r, s) for r in range(4) for s in ("objective", "global", "")}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(5, 1, "objective") == derive_seed(5, 1, "objective")
    a = torch.rand(4, generator=make_generator(0, 0, "x"))
    b = torch.rand(4, generator=make_generator(0, 0, "x"))
    c = torch.rand(4, generator=make_generator(0, 1, "x"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_threads_are_split_between_local_ranks(monkeypatch):
    before = torch.get_num_threads()
    try:
        cores = available_cores()
        assert set_threads(world_size=2, local_world_size=2) == max(1, cores // 2) == torch.get_num_threads()
        assert set_threads(world_size=1, threads=1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), None) and info.is_main and not info.distributed
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert broadcast_object({"a": 1}) == {"a": 1} and all_gather_object(3) == [3]


def _torchrun(out: Path, *overrides: str, resume: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "deltafm",
           "train", "--preset", "digits-tiny", *OPTS, *overrides, "--out", str(out)]
    if resume:
        cmd += ["--resume", resume]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """2 processes for 4 steps, then resumed with 2 processes to step 6."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    first = _torchrun(out, "train.steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _torchrun(out, "train.steps=6", resume="auto")
    assert second.returncode == 0, second.stderr[-3000:]
    return out


def test_torchrun_trains_and_resumes_with_two_processes(ddp_run):
    recs = _records(ddp_run)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]  # rank 0 logs, once per step
    assert [r["images"] for r in train_recs] == [64 * s for s in range(1, 7)]
    events = [(r["message"], r.get("world_size")) for r in recs if r["kind"] == "event"]
    assert ("start", 2) in events and ("resume", 2) in events
    c = load_checkpoint(ddp_run / "checkpoints" / "step_00000006")
    assert c.state["world_size"] == 2 and c.state["images_seen"] == 384
    assert len(c.state["rng"]) == 2  # every rank's generator state
    r0, r1 = c.state["rng"]
    assert not torch.equal(r0["objective"], r1["objective"])  # per-rank streams
    # the stored mean target adds up both ranks' batches: every image seen once
    assert float(c.state["mean_target"]["count"].sum()) == 384
    assert c.state["sampler"]["batch_in_epoch"] == 6


def test_a_rank_zero_error_stops_every_rank(ddp_run):
    """An occupied run folder is detected on rank 0 only; the other rank must stop too, not hang."""
    before = sorted(p.name for p in (ddp_run / "checkpoints").iterdir())
    done = _torchrun(ddp_run, "train.steps=6")
    assert done.returncode != 0
    assert "already holds checkpoints" in done.stderr
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == before


def test_resume_on_one_process_keeps_images_seen(ddp_run, tmp_path, capsys):
    cfg = load_config(find_preset("digits-tiny"), OPTS + ["train.steps=8", "train.threads=1"])
    with torch.random.fork_rng(devices=[]):
        res = train(cfg, tmp_path / "single", resume=str(ddp_run / "checkpoints" / "step_00000006"))
    assert "world size changed (2 -> 1)" in capsys.readouterr().err
    assert res.step == 8 and res.images_seen == 8 * 64
    c = load_checkpoint(list_checkpoints(tmp_path / "single" / "checkpoints")[-1])
    assert c.state["world_size"] == 1 and c.state["images_seen"] == 512
    # the global batch order continued where the two processes stopped
    assert c.state["sampler"]["batch_in_epoch"] == 8
    assert float(c.state["mean_target"]["count"].sum()) == 512


@pytest.mark.slow
def test_two_process_resume_is_bit_exact(ddp_run, tmp_path):
    ref = tmp_path / "ref"
    done = _torchrun(ref, "train.steps=6")
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_checkpoint(ref / "checkpoints" / "step_00000006")
    b = load_checkpoint(ddp_run / "checkpoints" / "step_00000006")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
