"""``deltafm sample`` streams to disk: the same files as the in-memory path, resumable after SIGKILL, memory
bounded by the batch size (peak RSS of a child process measured for a small and a large ``--num``)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_cases import run_cli, tree_digest
from deltafm.generate import generate, labels_for
from deltafm.images import write_outputs
from deltafm.pixels import to_uint8_nhwc
from deltafm.sample_cli import PAUSE_ENV, WORK_DIR
from deltafm.sample_store import ChunkStore, SampleStoreError, npy_header, write_npz
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train
from deltafm.train.restore import load_for_sampling

ROOT = Path(__file__).resolve().parents[1]
FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "sample.every=-1"]


def _train(out: Path, *overrides: str) -> Path:
    cfg = load_config(find_preset("digits-tiny"), [*FAST, "train.steps=3", "train.ckpt_every=3", *overrides])
    with torch.random.fork_rng(devices=[]):
        assert train(cfg, out).status == "done"
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("sample") / "run")


def _sample(run: Path, out: Path, *extra: str) -> str:
    rc, stdout, err = run_cli(["sample", "--ckpt", str(run), "--out", str(out), "--no-progress", "--threads", "1",
                               *extra])
    assert rc == 0, err
    return err


@contextlib.contextmanager
def _one_thread():
    """The CLI runs with --threads 1: the in-memory reference does too (float sums depend on threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _in_memory(run: Path, out: Path, *, num: int, solver: str, steps: int, cfg: float, seed: int, batch: int,
               class_id: int | None = None) -> None:
    """What ``deltafm sample`` wrote before it streamed: generate() in memory, then write_outputs()."""
    lm = load_for_sampling(run)
    labels = labels_for(num, lm.data.num_classes, class_id)
    corr = lm.correction("to_fm")  # digits-tiny samples with the bias correction on
    with _one_thread():
        x = generate(lm.model, labels=labels, shape=lm.shape, num_classes=lm.data.num_classes, solver=solver,
                     steps=steps, cfg=cfg, interval=(0.0, 1.0), correction=corr, seed=seed, batch_size=batch,
                     path=lm.objective.path)
    meta = dict(checkpoint=str(lm.checkpoint), step=lm.step, images_seen=lm.images_seen, ema=lm.ema, solver=solver,
                steps=steps, cfg=cfg, guidance_interval=[0.0, 1.0], map="to_fm", map_lam=corr.lam,
                map_window=[0.0, 1.0], bias_correction=True, lam=lm.lam, seed=seed, batch_size=batch, class_id=class_id,
                world_size=1)
    write_outputs(out, to_uint8_nhwc(x), labels, lm.data.num_classes, meta, lm.data.class_names)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------- same files as before


@pytest.mark.parametrize("num,solver,steps,cfg,seed,batch,class_id", [
    (50, "euler", 3, 1.0, 0, 16, None),   # last batch short
    (30, "sde", 3, 1.5, 2, 7, None),      # SDE noise per batch start, guidance
    (9, "heun", 2, 1.0, 1, 4, 3),         # one class
])
def test_streamed_outputs_are_the_in_memory_outputs_byte_for_byte(run, tmp_path, num, solver, steps, cfg, seed,
                                                                   batch, class_id):
    _in_memory(run, tmp_path / "old", num=num, solver=solver, steps=steps, cfg=cfg, seed=seed, batch=batch,
               class_id=class_id)
    extra = ["--class", str(class_id)] if class_id is not None else []
    _sample(run, tmp_path / "new", "--num", str(num), "--solver", solver, "--steps", str(steps), "--cfg", str(cfg),
            "--seed", str(seed), "--batch-size", str(batch), *extra)
    old, new = _files(tmp_path / "old"), _files(tmp_path / "new")
    assert sorted(new) == sorted(old)  # no work folder, no temporary file left
    for name in old:  # PNGs, sample.json, and samples.npz itself (zip members are written alike)
        assert new[name] == old[name], name
    with np.load(tmp_path / "new" / "samples.npz") as z:
        assert z["arr_0"].shape == (num, 8, 8, 1) and z["arr_0"].dtype == np.uint8 and z["labels"].dtype == np.int64
    json.loads((tmp_path / "new" / "sample.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_latent_samples_stream_into_the_same_npz(tmp_path):
    from deltafm.data import write_latent_shards

    g = torch.Generator().manual_seed(0)
    write_latent_shards(tmp_path / "lat", torch.randn(48, 4, 8, 8, generator=g) * 5, torch.arange(48) % 3,
                        shard_size=30, scale_factor=0.2, num_classes=3)
    run = _train(tmp_path / "run", "model.name=SiT-N/4", "data.name=latents", f"data.root={tmp_path / 'lat'}",
                 "train.batch_size=16", "train.steps=2", "train.ckpt_every=2")
    _sample(run, tmp_path / "s", "--num", "11", "--steps", "2", "--batch-size", "4", "--no-decode")
    lm = load_for_sampling(run)
    labels = labels_for(11, 3)
    with _one_thread():
        x = generate(lm.model, labels=labels, shape=lm.shape, num_classes=3, steps=2, correction=lm.correction("to_fm"),
                     seed=lm.config.sample.seed, batch_size=4, path=lm.objective.path)
    z = (x / lm.data.latent_scale + lm.data.latent_shift).numpy().astype(np.float32)
    np.savez(tmp_path / "old.npz", arr_0=z, labels=labels.numpy())
    assert (tmp_path / "s" / "latents.npz").read_bytes() == (tmp_path / "old.npz").read_bytes()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["latents.npz", "sample.json"]


def test_map_none_to_fm_and_to_delta_and_the_older_spelling(run, tmp_path):
    opts = ["--num", "6", "--steps", "2", "--batch-size", "4"]
    _sample(run, tmp_path / "none", *opts, "--map", "none")
    _sample(run, tmp_path / "off", *opts, "--bias-correction", "off")
    assert _files(tmp_path / "none") == _files(tmp_path / "off")
    _sample(run, tmp_path / "on", *opts, "--bias-correction", "on", "--map", "to_fm")  # agreeing: fine
    _sample(run, tmp_path / "default", *opts)  # digits-tiny: guidance on the interval [0, 1] = every t
    assert _files(tmp_path / "on") == _files(tmp_path / "default")
    _sample(run, tmp_path / "delta", *opts, "--map", "to_delta", "--lam", "0.1")
    lm = load_for_sampling(run)
    for name, corr in [("none", None), ("on", lm.correction("to_fm")), ("delta", lm.correction("to_delta", 0.1))]:
        with _one_thread():
            x = generate(lm.model, labels=labels_for(6, 10), shape=lm.shape, num_classes=10, steps=2,
                         correction=corr, seed=lm.config.sample.seed, batch_size=4, path=lm.objective.path)
        with np.load(tmp_path / name / "samples.npz") as z:
            assert np.array_equal(z["arr_0"], to_uint8_nhwc(x)), name
        meta = json.loads((tmp_path / name / "sample.json").read_text())
        want = ("none", None) if corr is None else (corr.direction, corr.lam)
        assert (meta["map"], meta["map_lam"]) == want and meta["lam"] == lm.lam
    assert meta["map_lam"] == 0.1 and _files(tmp_path / "delta") != _files(tmp_path / "on")


def test_the_map_acts_on_the_guidance_interval_only_when_asked(run, tmp_path):
    opts = ["--num", "6", "--steps", "4", "--batch-size", "4", "--cfg", "1.5", "--guidance-interval", "0.4", "1"]
    _sample(run, tmp_path / "guidance", *opts, "--bias-correction", "guidance")
    _sample(run, tmp_path / "same", *opts, "--map", "to_fm", "--correction", "guidance")
    assert _files(tmp_path / "guidance") == _files(tmp_path / "same")
    _sample(run, tmp_path / "always", *opts, "--bias-correction", "always")
    assert _files(tmp_path / "always") != _files(tmp_path / "guidance")
    lm = load_for_sampling(run)
    for name, window in [("guidance", (0.4, 1.0)), ("always", (0.0, 1.0))]:
        with _one_thread():
            x = generate(lm.model, labels=labels_for(6, 10), shape=lm.shape, num_classes=10, steps=4, cfg=1.5,
                         interval=(0.4, 1.0), correction=lm.correction("to_fm", interval=window),
                         seed=lm.config.sample.seed, batch_size=4, path=lm.objective.path)
        with np.load(tmp_path / name / "samples.npz") as z:
            assert np.array_equal(z["arr_0"], to_uint8_nhwc(x)), name
        assert json.loads((tmp_path / name / "sample.json").read_text())["map_window"] == list(window)


# ----------------------------------------------------------------------------------- the chunk store


def test_write_npz_matches_np_savez_and_copies_file_parts(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (10, 3, 2, 3), dtype=np.uint8)
    np.save(tmp_path / "part.npy", a[4:])
    offset = len(npy_header(np.uint8, a[4:].shape))  # the header np.save wrote
    labels = np.arange(10, dtype=np.int64)
    write_npz(tmp_path / "s.npz", {"arr_0": (np.uint8, a.shape, [a[:4], (tmp_path / "part.npy", offset)]),
                                   "labels": (np.int64, (10,), [labels])})
    np.savez(tmp_path / "ref.npz", arr_0=a, labels=labels)
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "ref.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "s.npz") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    with pytest.raises(ValueError, match="expected"):  # a short member is refused, and nothing is left
        write_npz(tmp_path / "bad.npz", {"arr_0": (np.uint8, a.shape, [a[:4]])})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.npy", "ref.npz", "s.npz"]


def test_chunk_store_keeps_finished_chunks_only_and_locks_its_folder(tmp_path):
    settings = {"seed": 1, "solver": "euler"}
    st = ChunkStore(tmp_path / "w", settings, num=10, chunk_size=4, item_shape=(2,), dtype=np.float32)
    assert st.open() == []
    with pytest.raises(SampleStoreError, match="another process"):
        ChunkStore(tmp_path / "w", settings, 10, 4, (2,), np.float32).open()
    for start in (0, 4, 8):
        st.write(start, np.full((st.count(start), 2), start, dtype=np.float32))
    st.close()
    (tmp_path / "w" / "chunk_000000000012.npy.tmp").write_bytes(b"half a chunk")  # killed mid-write
    f = tmp_path / "w" / "chunk_000000000004.npy"
    f.write_bytes(f.read_bytes()[:-3])  # damaged (not by the store: its writes are atomic)
    warned: list[str] = []
    again = ChunkStore(tmp_path / "w", settings, 10, 4, (2,), np.float32)
    assert again.open(warned.append) == [0, 8]
    assert len(warned) == 1 and "chunk_000000000004" in warned[0]
    assert not list((tmp_path / "w").glob("*.tmp"))
    again.write(4, np.full((4, 2), 4, dtype=np.float32))
    assert again.take([9, 0, 5]).tolist() == [[8, 8], [0, 0], [4, 4]]
    with pytest.raises(SampleStoreError, match=r"seed: 1 there, 2 now"):
        ChunkStore(tmp_path / "w", {"seed": 2, "solver": "euler"}, 10, 4, (2,), np.float32).open()
    again.remove()
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------- kill and resume


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _chunks(out: Path) -> list[Path]:
    return sorted((out / WORK_DIR).glob("chunk_*.npy"))


def test_sigkill_then_the_same_command_resumes_and_gives_the_same_files(run, tmp_path):
    opts = ["--num", "60", "--solver", "sde", "--steps", "3", "--cfg", "1.5", "--batch-size", "4", "--seed", "5"]
    cmd = [sys.executable, "-m", "deltafm", "sample", "--ckpt", str(run), "--threads", "1", "--no-progress", *opts]
    kill_after = random.Random().randint(1, 10)  # of 15 chunks
    victim = subprocess.Popen(cmd + ["--out", str(tmp_path / "cut")], env=_env(**{PAUSE_ENV: "0.2"}),
                              stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while len(_chunks(tmp_path / "cut")) < kill_after:
            assert victim.poll() is None, victim.stderr.read()
            assert time.time() - t0 < 120, "no chunk written"
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    finished = len(_chunks(tmp_path / "cut"))
    assert kill_after <= finished < 15 and not (tmp_path / "cut" / "samples.npz").exists()
    (tmp_path / "cut" / WORK_DIR / f"chunk_{4 * finished:012d}.npy.tmp").write_bytes(b"\x93NUMPY half")
    err = _sample(run, tmp_path / "cut", *opts)
    assert f"resuming: {4 * finished} of 60 samples" in err, err
    _sample(run, tmp_path / "ref", *opts)
    assert _files(tmp_path / "cut") == _files(tmp_path / "ref"), f"killed after {finished} chunks"
    assert not (tmp_path / "cut" / WORK_DIR).exists()


def test_a_kill_while_the_final_files_are_written_is_resumed_too(run, tmp_path, monkeypatch):
    import deltafm.sample_store as store

    class Killed(Exception):
        pass

    def dying(path, entries):
        Path(str(path) + ".tmp").write_bytes(b"PK half a zip")  # what a kill mid-write leaves
        raise Killed

    opts = ["--num", "14", "--steps", "2", "--batch-size", "4"]
    monkeypatch.setattr(store, "write_npz", dying)
    with pytest.raises(Killed):
        _sample(run, tmp_path / "cut", *opts)
    monkeypatch.undo()
    assert len(_chunks(tmp_path / "cut")) == 4 and (tmp_path / "cut" / "grid.png").is_file()
    assert "resuming: 14 of 14 samples" in _sample(run, tmp_path / "cut", *opts)
    _sample(run, tmp_path / "ref", *opts)
    assert _files(tmp_path / "cut") == _files(tmp_path / "ref")


def test_a_finished_run_leaves_no_work_folder_and_a_rerun_rewrites_the_same_files(run, tmp_path):
    _sample(run, tmp_path / "a", "--num", "12", "--steps", "2", "--batch-size", "5")
    first = tree_digest(tmp_path / "a")
    _sample(run, tmp_path / "a", "--num", "12", "--steps", "2", "--batch-size", "5")
    assert tree_digest(tmp_path / "a") == first
    assert not (tmp_path / "a" / WORK_DIR).exists()


# ----------------------------------------------------------------------------------- memory


#: Runs ``deltafm sample`` in a child, then prints the child's peak RSS (VmHWM, kB). Measured inside the
#: child: its rusage from wait4 would include the RSS of this (large) test process it was forked from.
_MEASURED = """
import sys
from deltafm.cli import main
rc = main(sys.argv[1:])
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0])
sys.exit(rc)
"""


def _peak_rss_mib(run: Path, out: Path, num: int) -> float:
    """Peak RSS (MiB) of a ``deltafm sample`` process."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc (Linux)")
    args = ["sample", "--ckpt", str(run), "--num", str(num), "--solver", "euler", "--steps", "1",
            "--batch-size", "64", "--threads", "1", "--no-progress", "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", _MEASURED, *args], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (num, 8, 8, 1)
    return int(done.stdout.split()[-1]) / 1024


#: Peak RSS growth allowed from the small to the large run, MiB. Measured on a 2-core machine (batch 64,
#: digits 8x8): streamed, 2000 -> 20000 about +2 and 1000 -> 100000 about +2 (labels: 8 bytes a sample);
#: the in-memory writer this replaced grew +14 and +104 (float32 batches, their concatenation, the uint8
#: copy). Run-to-run noise is about 1 to 2 MiB.
GROWTH_BOUND_MIB = 8.0


def test_peak_memory_does_not_grow_with_num(run, tmp_path):
    small = _peak_rss_mib(run, tmp_path / "small", 2000)
    large = _peak_rss_mib(run, tmp_path / "large", 20000)
    print(f"peak RSS: num=2000 {small:.1f} MiB, num=20000 {large:.1f} MiB, growth {large - small:+.1f} MiB")
    assert large - small < GROWTH_BOUND_MIB, (small, large)


@pytest.mark.slow
def test_peak_memory_of_100000_samples_is_that_of_1000(run, tmp_path):
    small = _peak_rss_mib(run, tmp_path / "small", 1000)
    large = _peak_rss_mib(run, tmp_path / "large", 100000)
    print(f"peak RSS: num=1000 {small:.1f} MiB, num=100000 {large:.1f} MiB, growth {large - small:+.1f} MiB")
    assert large - small < GROWTH_BOUND_MIB, (small, large)
