"""``deltafm mean-target``: ū estimated from data equals the objective's running ū over the same batches and
the same x0 (and t) draws, and makes the ΔFM <-> FM maps available on a converted checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltafm.cli import main as deltafm_main
from deltafm.convert.mean_target import mean_target_seed
from deltafm.data import load_dataset
from deltafm.data.latents import LatentShardWriter
from deltafm.train.builders import build_objective
from deltafm.train.checkpoint import load_checkpoint, resolve_checkpoint
from deltafm.train.restore import load_for_sampling
from test_convert import SIDE, C, K, convert

N_ITEMS, BATCH, SEED = 37, 8, 3


def write_latents(root: Path, channels: int = C) -> None:
    g = torch.Generator().manual_seed(11)
    z = torch.randn(N_ITEMS, channels, SIDE, SIDE, generator=g) * 4 + 1.5
    labels = torch.arange(N_ITEMS) % K
    with LatentShardWriter(root, shard_size=16, scale_factor=0.18215, num_classes=K, dtype=torch.float32) as w:
        w.add(z, labels)


def test_mean_target_equals_the_objectives_running_mean(tmp_path, capsys):
    out, _, _ = convert(tmp_path, "sit")
    lm = load_for_sampling(out)
    with pytest.raises(ValueError, match="no mean target"):
        lm.correction("to_delta", lam=0.05)
    write_latents(tmp_path / "lat")
    rc = deltafm_main(["mean-target", "--ckpt", str(out), "--data", "latents", "--root", str(tmp_path / "lat"),
                       "--batch-size", str(BATCH), "--seed", str(SEED), "--out", str(tmp_path / "with-mean"),
                       "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    stored = load_checkpoint(resolve_checkpoint(tmp_path / "with-mean")).state["mean_target"]

    # the objective, updated over the same batches with the same (t, x0) draws
    objective = build_objective(lm.config, K)
    ds = load_dataset("latents", root=tmp_path / "lat")
    gen = torch.Generator().manual_seed(mean_target_seed(SEED))
    other = torch.Generator().manual_seed(0)
    for start in range(0, N_ITEMS, BATCH):
        x1, y = ds.load_batch(torch.arange(start, min(start + BATCH, N_ITEMS))), ds.labels[start:start + BATCH]
        t = objective.time_sampler.sample(x1.shape[0], generator=gen, dtype=x1.dtype)
        x0 = torch.randn(x1.shape, generator=gen, dtype=x1.dtype)
        with torch.no_grad():
            objective(lm.model, x1, y, generator=other, noise=x0, t=t)
    want = objective.state_dict()
    assert set(stored) == set(want)
    for k in want:
        assert torch.equal(stored[k], want[k]), k
    assert float(want["count"].sum()) == N_ITEMS

    # the maps now work on the converted model, with ū = the objective's
    lm2 = load_for_sampling(tmp_path / "with-mean")
    corr = lm2.correction("to_delta", lam=0.05)
    t = torch.rand(4)
    yq = torch.tensor([0, 1, 2, K])
    torch.testing.assert_close(corr.u_bar(t, yq), objective.bias_correction("to_delta", 0.05).u_bar(t, yq))
    x = torch.randn(4, C, SIDE, SIDE)
    with torch.no_grad():
        v = lm2.model(x, t, yq)
        torch.testing.assert_close(lm2.model(x, t, yq), lm.model(x, t, yq))  # same weights
        torch.testing.assert_close(corr(v, t, yq), (v - 0.05 * corr.u_bar(t, yq)) / 0.95)


def test_mean_target_bad_inputs(tmp_path, capsys):
    out, _, _ = convert(tmp_path, "repa")
    write_latents(tmp_path / "lat3", channels=3)  # not the model's 4 channels
    rc = deltafm_main(["mean-target", "--ckpt", str(out), "--data", "latents", "--root", str(tmp_path / "lat3"),
                       "--out", str(tmp_path / "m")])
    assert rc == 2 and "does not fit" in capsys.readouterr().err
    rc = deltafm_main(["mean-target", "--ckpt", str(out), "--data", "latents", "--root", str(tmp_path / "none"),
                       "--out", str(tmp_path / "m")])
    assert rc == 2 and capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "m" / "checkpoints").exists()


def test_in_place_replaces_the_state(tmp_path):
    out, _, _ = convert(tmp_path, "deltafm-ref")
    write_latents(tmp_path / "lat")
    rc = deltafm_main(["mean-target", "--ckpt", str(out), "--data", "latents", "--root", str(tmp_path / "lat"),
                       "--max-items", "10", "--in-place", "--no-progress"])
    assert rc == 0
    lm = load_for_sampling(out)
    assert lm.objective.mean_target.initialized and float(lm.objective.mean_target.count.sum()) == 10
