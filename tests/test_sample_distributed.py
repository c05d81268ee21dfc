"""``deltafm sample`` under torchrun: 2 gloo processes write the files 1 process writes (euler and SDE, a ``--num``
that neither the world size nor the batch size divides), errors print once for the job, and a killed 2-process
job resumes (with 2 processes or 1) without losing or duplicating an image."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_cases import run_cli
from deltafm.sample_cli import PAUSE_ENV, WORK_DIR
from deltafm.sample_store import ChunkStore
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dsample") / "run"
    cfg = load_config(find_preset("digits-tiny"), ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1",
                                                   "sample.every=-1", "train.steps=3", "train.ckpt_every=3"])
    with torch.random.fork_rng(devices=[]):
        assert train(cfg, out).status == "done"
    return out


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _cmd(run: Path, out: Path, opts: list[str], nproc: int = 2) -> list[str]:
    # torchrun's own parser stops at an abbreviation of its options: --num is ambiguous there (--numa-binding)
    opts = ["--num-samples" if o == "--num" else o for o in opts]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "deltafm",
            "sample", "--ckpt", str(run), "--out", str(out), "--threads", "1", "--no-progress", *opts]


def _torchrun(run: Path, out: Path, opts: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run, out, opts), env=_env(), capture_output=True, text=True, timeout=300)


def _one_process(run: Path, out: Path, opts: list[str]) -> str:
    rc, _, err = run_cli(["sample", "--ckpt", str(run), "--out", str(out), "--threads", "1", "--no-progress", *opts])
    assert rc == 0, err
    return err


def _assert_same_samples(a: Path, b: Path, world_a: int, world_b: int) -> None:
    """Same files, same bytes (samples.npz, every PNG); sample.json differs in world_size only."""
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())  # no work folder left either
    for name in files_a:
        if name != "sample.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta_a, meta_b = json.loads((a / "sample.json").read_text()), json.loads((b / "sample.json").read_text())
    assert (meta_a.pop("world_size"), meta_b.pop("world_size")) == (world_a, world_b)
    assert meta_a == meta_b


def test_chunks_are_dealt_round_robin_and_every_unfinished_chunk_once():
    st = ChunkStore("unused", {}, num=50, chunk_size=8, item_shape=(1,), dtype=np.uint8)
    assert list(st.starts) == [0, 8, 16, 24, 32, 40, 48] and st.count(48) == 2
    assert st.deal([], 0, 2) == [0, 16, 32, 48] and st.deal([], 1, 2) == [8, 24, 40]
    assert st.deal([], 0, 1) == list(st.starts)
    for world in (1, 2, 3, 8):
        for done in ([], [0, 8], [16, 40, 48], list(st.starts)):
            shares = [st.deal(done, r, world) for r in range(world)]
            flat = sorted(s for share in shares for s in share)
            assert flat == [s for s in st.starts if s not in done]  # each unfinished chunk exactly once
            assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    with pytest.raises(ValueError, match="rank 2"):
        st.deal([], 2, 2)


@pytest.mark.parametrize("solver,extra", [pytest.param("euler", [], marks=pytest.mark.slow), ("sde", ["--cfg", "1.5"])])
def test_two_processes_write_the_files_of_one_process(run, tmp_path, solver, extra):
    # 30 = 7 chunks of 4 and one of 2: neither 2 nor 2 x 4 divides it; rank 0 takes 4 chunks, rank 1 takes 4
    opts = ["--num", "30", "--batch-size", "4", "--solver", solver, "--steps", "3", "--seed", "7", *extra]
    done = _torchrun(run, tmp_path / "two", opts)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 30 samples") == 1  # rank 0 writes the final files
    _one_process(run, tmp_path / "one", opts)
    _assert_same_samples(tmp_path / "one", tmp_path / "two", 1, 2)
    with np.load(tmp_path / "two" / "samples.npz") as z:
        assert z["arr_0"].shape == (30, 8, 8, 1) and z["labels"].tolist() == [i % 10 for i in range(30)]


@pytest.mark.slow
def test_a_bad_option_stops_every_rank_with_one_error_line(run, tmp_path):
    done = _torchrun(run, tmp_path / "out", ["--num", "8", "--class", "10"])  # found after the checkpoint is read
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --class 10 is out of range: the model has classes 0 .. 9"], done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- kill and resume


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _rank_pid(job: subprocess.Popen, rank: int) -> int:
    for pid in _descendants(job.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no process of rank {rank} below {job.pid}")


def _kill_all(job: subprocess.Popen) -> None:
    for pid in [job.pid, *_descendants(job.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _chunks(out: Path) -> int:
    return len(list((out / WORK_DIR).glob("chunk_*.npy")))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("victim,resume_nproc", [("rank 1", 2), ("every process", 1)])
def test_a_killed_two_process_job_resumes_without_losing_or_duplicating_an_image(run, tmp_path, victim,
                                                                                   resume_nproc):
    opts = ["--num", "42", "--batch-size", "4", "--solver", "sde", "--steps", "3", "--cfg", "1.5", "--seed", "3"]
    cut = tmp_path / "cut"
    kill_after = random.Random().randint(2, 7)  # of 11 chunks
    job = subprocess.Popen(_cmd(run, cut, opts), env=_env(**{PAUSE_ENV: "0.3"}), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0 = time.time()
        while _chunks(cut) < kill_after:
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.time() - t0 < 120, "no chunk written"
            time.sleep(0.01)
        # a second job on the same folder is refused while this one runs (rank 0 holds the lock)
        rc, _, err = run_cli(["sample", "--ckpt", str(run), "--out", str(cut), "--threads", "1", "--no-progress",
                              *opts])
        assert rc == 2 and "another process is writing samples" in err, err
        if victim == "rank 1":
            os.kill(_rank_pid(job, 1), signal.SIGKILL)  # torchrun then stops rank 0
        else:  # the agent and every worker (torchrun starts the workers in sessions of their own)
            _kill_all(job)
        job.wait(60)
    finally:
        if job.poll() is None:
            _kill_all(job)
            job.wait(30)
    assert job.returncode != 0
    finished = _chunks(cut)
    assert kill_after <= finished < 11 and not (cut / "samples.npz").exists()
    if resume_nproc == 2:
        done = _torchrun(run, cut, opts)
        assert done.returncode == 0, done.stderr[-3000:]
        err = done.stderr
    else:
        err = _one_process(run, cut, opts)
    assert f"resuming: {4 * finished} of 42 samples" in err, err
    _one_process(run, tmp_path / "ref", opts)
    _assert_same_samples(tmp_path / "ref", cut, 1, resume_nproc)
