"""The training loop and the CLI on digits-tiny: outputs, exact resume after SIGKILL, SIGTERM, NaN stop,
bad input that loses nothing, and deterministic sampling into the ADM npz layout."""

from __future__ import annotations

import hashlib
import json
import math
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

from deltafm.cli import main as cli
from deltafm.objective import DeltaFMObjective
from deltafm.train.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from deltafm.train.config import find_preset, load_config
from deltafm.train.ema import EMA, ema_beta
from deltafm.train.logging import measure_matmul_peak, mfu
from deltafm.train.loop import NonFiniteLossError, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1"]


def _cfg(*overrides: str):
    return load_config(find_preset("digits-tiny"), [*FAST, *overrides])


def _train(cfg, out, resume=None):
    with torch.random.fork_rng(devices=[]):
        return train(cfg, out, resume=resume)


def _records(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(path: Path, name: str = "model") -> dict[str, torch.Tensor]:
    c = load_checkpoint(path)
    return c.model if name == "model" else c.ema


# ----------------------------------------------------------------------------------------------- EMA


def test_ema_matches_the_closed_form():
    torch.manual_seed(0)
    live = torch.nn.Linear(3, 2)
    ema = EMA(live, decay=0.9)
    e0 = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    w = [p.detach().clone() for p in live.parameters()]
    for _ in range(5):
        ema.update(live, batch_images=8, images_seen=8)
    # θ̄_k = w + β^k (θ̄_0 − w)
    for pe, a, b in zip(ema.module.parameters(), e0, w):
        torch.testing.assert_close(pe, b + 0.9**5 * (a - b), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_half_life_and_rampup():
    assert ema_beta(100, 10**6, halflife_images=100) == pytest.approx(0.5)
    assert ema_beta(50, 10**6, halflife_images=100) == pytest.approx(math.sqrt(0.5))
    # rampup caps the half-life at rampup * images_seen: 0.1 * 1000 = 100
    assert ema_beta(100, 1000, halflife_images=10_000, rampup=0.1) == pytest.approx(0.5)
    assert ema_beta(7, 1, decay=0.9999) == 0.9999
    with pytest.raises(ValueError):
        ema_beta(1, 1, decay=0.9, halflife_images=10)


def test_mfu_and_a_measured_peak():
    peak = measure_matmul_peak("cpu", torch.float32, size=128, seconds=0.02)
    assert peak > 1e6
    assert mfu(1e6, 100.0, 6e8) == pytest.approx(0.5)  # 3 * 1e6 * 100 / 6e8
    assert mfu(None, 100.0, 1.0) is None


# ------------------------------------------------------------------------------------- a short run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "run"
    cfg = _cfg("train.steps=6", "train.ckpt_every=2", "train.keep_last=2", "log.every=1", "sample.every=3",
               "sample.num=20", "sample.steps=4")
    res = _train(cfg, out)
    assert res.status == "done" and res.step == 6
    return out


def test_a_run_writes_logs_checkpoints_and_grids(run):
    recs = _records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["images"] for r in recs] == [64 * s for s in range(1, 7)]
    for r in recs:
        assert r["lam"] == 0.05 and r["images_per_s"] > 0 and 0 < r["mfu"]
        # loss = positive - lam * negative, averaged per sample (contrast_unconditional=True)
        assert r["loss"] == pytest.approx(r["positive"] - 0.05 * r["negative"], rel=1e-5)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000004", "step_00000006"]
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_00000003.png", "step_00000006.png"]
    c = load_checkpoint(run / "checkpoints" / "step_00000006")
    st = c.state
    assert st["step"] == 6 and st["images_seen"] == 384 and st["world_size"] == 1
    assert st["sampler"]["epoch"] == 0 and st["sampler"]["batch_in_epoch"] == 6
    assert st["config"]["model"]["name"] == "unet-t" and st["data"]["image_size"] == 8
    assert float(st["mean_target"]["count"].sum()) == 384  # every image seen, for the bias correction
    assert set(st["rng"][0]) >= {"torch_cpu", "numpy", "python", "objective"}
    assert c.ema is not None and set(c.ema) == set(c.model)


def _sample(ckpt: Path, out: Path, *extra: str) -> dict[str, np.ndarray]:
    rc = cli(["sample", "--ckpt", str(ckpt), "--out", str(out), "--no-progress", "--threads", "1", "--steps", "3",
              *extra])
    assert rc == 0
    with np.load(out / "samples.npz") as z:
        return {k: z[k] for k in z.files}


def test_sample_writes_the_adm_layout_and_is_deterministic(run, tmp_path):
    a = _sample(run, tmp_path / "a", "--num", "25", "--seed", "3", "--batch-size", "25")
    assert set(a) == {"arr_0", "labels"}
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (25, 8, 8, 1)
    assert a["labels"].tolist() == [i % 10 for i in range(25)]
    assert (tmp_path / "a" / "grid.png").is_file()
    assert sorted(p.name for p in (tmp_path / "a").glob("class_*.png")) == [f"class_{k:03d}.png" for k in range(10)]
    # same seed -> same images, whatever the batch size (per-image noise seeds)
    b = _sample(run, tmp_path / "b", "--num", "25", "--seed", "3", "--batch-size", "7")
    assert np.array_equal(a["arr_0"], b["arr_0"])
    # another seed, the raw weights, guidance or the correction change the images
    for i, extra in enumerate((["--seed", "4"], ["--seed", "3", "--no-ema"], ["--seed", "3", "--cfg", "3"],
                               ["--seed", "3", "--bias-correction", "off"])):
        c = _sample(run, tmp_path / f"c{i}", "--num", "25", "--batch-size", "25", *extra)
        assert not np.array_equal(a["arr_0"], c["arr_0"]), extra
    one = _sample(run, tmp_path / "one", "--num", "6", "--class", "7", "--solver", "sde")
    assert one["labels"].tolist() == [7] * 6
    meta = json.loads((tmp_path / "one" / "sample.json").read_text())
    assert meta["solver"] == "sde" and meta["class_id"] == 7 and meta["bias_correction"] is True


def test_sde_sampling_is_deterministic_per_seed(run, tmp_path):
    a = _sample(run, tmp_path / "a", "--num", "8", "--solver", "sde", "--seed", "1")
    b = _sample(run, tmp_path / "b", "--num", "8", "--solver", "sde", "--seed", "1")
    assert np.array_equal(a["arr_0"], b["arr_0"])


# --------------------------------------------------------------------------------------- bad input


def _fails(args: list[str], capsys, *needles: str) -> str:
    rc = cli(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    first = [line for line in err.splitlines() if not line.startswith("warning: ")][0]
    assert first.startswith("error: "), err  # one clear message, no traceback
    for n in needles:
        assert n in err, err
    return err


def test_bad_input_gets_a_clear_error_and_loses_nothing(run, tmp_path, capsys):
    before = _tree_digest(run)
    base = ["train", "--preset", "digits-tiny", *FAST, "--out", str(run)]
    _fails(base + ["optim.lrr=1"], capsys, "unknown config key 'optim.lrr'", "did you mean 'optim.lr'")
    _fails(base + ["objective.lam=1.0"], capsys, "objective.lam", "0 <= lam < 1")
    missing = tmp_path / "no-such-folder"
    _fails(base + ["data.name=mnist", f"data.root={missing}", "--resume", "auto"], capsys, str(missing))
    _fails(base + ["model.name=SiT-N/2", "model.kwargs.patch_size=3", "--resume", "auto"], capsys,
           "cannot use model 'SiT-N/2'", "8x8", "patch size 3")
    _fails(base, capsys, "already holds checkpoints", "--resume auto")
    assert _tree_digest(run) == before
    # nothing was created for a fresh run folder either
    fresh = tmp_path / "fresh"
    _fails(["train", "--preset", "digits-tiny", "data.name=mnist", f"data.root={missing}", "--out", str(fresh)],
           capsys, "mnist")
    assert not fresh.exists()


def test_damaged_and_pickle_checkpoints(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step_00000006"
    f = newest / "ema.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails(["sample", "--ckpt", str(newest), "--out", str(tmp_path / "s")], capsys, "truncated")
    _fails(["train", "--resume", str(newest), "--out", str(copy)], capsys, "truncated")
    # a tampered byte in an otherwise complete checkpoint
    g = copy / "checkpoints" / "step_00000004" / "model.safetensors"
    data = bytearray(g.read_bytes())
    data[-1] ^= 1
    g.write_bytes(bytes(data))
    _fails(["sample", "--ckpt", str(g.parent), "--out", str(tmp_path / "s")], capsys, "sha256")
    _fails(["sample", "--ckpt", str(copy), "--out", str(tmp_path / "s")], capsys, "no valid checkpoint")
    # pickle-only checkpoints are refused, never unpickled
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    _fails(["sample", "--ckpt", str(pt), "--out", str(tmp_path / "s")], capsys, "pickle", "refusing")
    _fails(["train", "--resume", str(pt), "--out", str(tmp_path / "r")], capsys, "pickle")
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_resume_auto_skips_a_damaged_newest_checkpoint(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step_00000006"
    (newest / "model.safetensors").write_bytes(b"\x00" * 10)
    cfg = _cfg("train.steps=8", "train.ckpt_every=2", "train.keep_last=2", "log.every=1", "sample.every=-1")
    res = _train(cfg, copy, resume="auto")
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000006" in err and "set aside step_00000006" in err
    assert res.step == 8 and res.images_seen == 8 * 64
    assert [r["step"] for r in _records(copy)][-4:] == [5, 6, 7, 8]  # continued from step 4
    assert (copy / "checkpoints" / "step_00000006.invalid-0" / "model.safetensors").read_bytes() == b"\x00" * 10


def test_latent_training_and_sampling(tmp_path, capsys):
    from deltafm.data import write_latent_shards

    g = torch.Generator().manual_seed(0)
    z = torch.randn(96, 4, 8, 8, generator=g) * 5.0  # raw VAE-like latents
    write_latent_shards(tmp_path / "lat", z, torch.arange(96) % 3, shard_size=50, scale_factor=0.2, num_classes=3)
    cfg = _cfg("model.name=SiT-N/4", "data.name=latents", f"data.root={tmp_path / 'lat'}", "train.batch_size=16",
               "train.steps=2", "sample.every=0")
    res = _train(cfg, tmp_path / "run")
    assert res.step == 2 and res.sample_grid is None  # these latents record no VAE: no grid, said once
    assert "no sample grids for these latents: the latents record no VAE" in capsys.readouterr().err
    st = load_checkpoint(res.checkpoint).state
    assert st["data"]["kind"] == "latents" and st["data"]["channels"] == 4 and st["data"]["latent_scale"] == 0.2
    assert st["data"]["vae_source"] is None and st["data"]["vae_identity"] is None
    base = ["sample", "--ckpt", str(tmp_path / "run"), "--num", "5", "--steps", "2", "--threads", "1", "--no-progress"]
    assert cli([*base, "--out", str(tmp_path / "x")]) == 2  # nothing to decode with, and raw latents not asked for
    assert "cannot decode the samples: the latents record no VAE" in capsys.readouterr().err
    assert cli([*base, "--no-decode", "--out", str(tmp_path / "s")]) == 0
    with np.load(tmp_path / "s" / "latents.npz") as f:
        assert f["arr_0"].shape == (5, 4, 8, 8) and f["arr_0"].dtype == np.float32
        assert f["labels"].tolist() == [0, 1, 2, 0, 1]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = DeltaFMObjective.__call__
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            out.loss = out.loss * float("nan")
            out.parts["loss"] = out.loss.detach()
        return out

    monkeypatch.setattr(DeltaFMObjective, "__call__", poisoned)
    out = tmp_path / "run"
    cfg = _cfg("train.steps=8", "train.ckpt_every=2", "sample.every=-1")
    with pytest.raises(NonFiniteLossError, match="step 5") as e:
        _train(cfg, out)
    assert "step_00000004" in str(e.value)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000004"]
    verify_checkpoint(out / "checkpoints" / "step_00000004")


# ------------------------------------------------------------------------------ subprocess: signals


def _cmd(out: Path, *overrides: str, resume: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "deltafm", "train", "--preset", "digits-tiny", *FAST, "log.every=1",
           "sample.every=-1", *overrides, "--out", str(out)]
    return cmd + (["--resume", resume] if resume else [])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120.0) -> None:
    log = run / "log.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before step {step}")
        if log.exists():
            steps = [r["step"] for r in _records(run)]
            if steps and steps[-1] >= step:
                return
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    # the first checkpoint is written at step 3, so a kill from step 4 on always has one to resume from
    steps, kill_at = 16, random.Random().randint(4, 13)
    opts = [f"train.steps={steps}", "train.ckpt_every=3", "train.keep_last=2"]
    ref = subprocess.Popen(_cmd(tmp_path / "ref", *opts), env=_env(), stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_cmd(tmp_path / "cut", *opts), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(victim, tmp_path / "cut", kill_at)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    killed_at = _records(tmp_path / "cut")[-1]["step"]
    done = subprocess.run(_cmd(tmp_path / "cut", *opts, resume="auto"), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert ref.wait(300) == 0, ref.stderr.read()
    a = tmp_path / "ref" / "checkpoints" / f"step_{steps:08d}"
    b = tmp_path / "cut" / "checkpoints" / f"step_{steps:08d}"
    resumed = [r for r in _records(tmp_path / "cut", "event") if r["message"] == "resume"]
    assert len(resumed) == 1, f"killed at step {killed_at}"
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"weights differ after a kill at step {killed_at}"
    ea, eb = _weights(a, "ema"), _weights(b, "ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    la = {r["step"]: r["loss"] for r in _records(tmp_path / "ref")}
    lb = {r["step"]: r["loss"] for r in _records(tmp_path / "cut")}
    assert all(la[s] == lb[s] for s in la), "per-step losses differ"


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, "train.steps=400", "train.ckpt_every=1000"), env=_env(),
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(proc, out, 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted by signal" in err
    (ckpt,) = list_checkpoints(out / "checkpoints")
    c = load_checkpoint(ckpt)
    assert c.state["reason"] == "signal" and c.step == _records(out)[-1]["step"] < 400
    assert c.state["images_seen"] == 64 * c.step
    events = [r["message"] for r in _records(out, "event")]
    assert events[-2:] == ["checkpoint", "interrupted"]
