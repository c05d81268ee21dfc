"""``train.compile`` inside the training loop (issue 14's GPU readiness, run here on CPU).

The loop compiles what the step calls with ``torch.compile(model, dynamic=False, mode=train.compile_mode)``.
A compiled SiT run must train what the eager run trains (same data, noise and negatives; only the kernels
differ, so the weights agree up to fp32 roundoff carried through AdamW) and resume bit-exactly: the same
compiled kernels run on either side of the interruption.
"""

from __future__ import annotations

import pytest
import torch

from deltafm.train.checkpoint import load_checkpoint
from deltafm.train.config import ConfigError, find_preset, load_config
from deltafm.train.loop import train

FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "sample.every=-1",
        "model.name=SiT-N/2", "train.ckpt_every=2"]


def _cfg(*overrides: str):
    return load_config(find_preset("digits-tiny"), [*FAST, *overrides])


def _train(cfg, out, resume=None):
    with torch.random.fork_rng(devices=[]):
        return train(cfg, out, resume=resume)


def test_compile_mode_is_checked():
    with pytest.raises(ConfigError, match="'train.compile_mode'.*train.compile=true"):
        _cfg("train.steps=2", "train.compile_mode=max-autotune")
    with pytest.raises(ConfigError, match="train.compile_mode"):
        _cfg("train.steps=2", "train.compile=true", "train.compile_mode=fastest")


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_the_loop_compiles_with_static_shapes_and_the_configured_mode(monkeypatch, tmp_path, mode):
    calls: list[tuple[type, dict]] = []

    def record(model, **kwargs):
        calls.append((type(model), kwargs))
        return model  # run eagerly: only the call is under test here

    monkeypatch.setattr(torch, "compile", record)
    res = _train(_cfg("train.steps=1", "train.compile=true", f"train.compile_mode={mode}"), tmp_path)
    assert res.step == 1
    assert [(t.__name__, kw) for t, kw in calls] == [("SiT", {"dynamic": False, "mode": mode})]
    calls.clear()
    _train(_cfg("train.steps=1"), tmp_path / "eager")
    assert calls == []


@pytest.mark.slow
def test_a_compiled_run_trains_like_eager_and_resumes_bit_exactly(tmp_path):
    torch.compiler.reset()  # start from no compiled graphs (and no recompile count) left by earlier tests
    def weights(run: str) -> dict[str, torch.Tensor]:
        ck = load_checkpoint(tmp_path / run / "checkpoints" / "step_00000004")
        return {f"model.{k}": v for k, v in ck.model.items()} | {f"ema.{k}": v for k, v in ck.ema.items()}

    start = load_checkpoint(_train(_cfg("train.steps=2"), tmp_path / "eager").checkpoint)
    assert _train(_cfg("train.steps=4"), tmp_path / "eager", resume="auto").step == 4
    assert _train(_cfg("train.steps=4", "train.compile=true"), tmp_path / "whole").step == 4
    assert _train(_cfg("train.steps=2", "train.compile=true"), tmp_path / "split").step == 2
    assert _train(_cfg("train.steps=4", "train.compile=true"), tmp_path / "split", resume="auto").step == 4
    eager, whole, split = weights("eager"), weights("whole"), weights("split")
    for k, v in whole.items():
        assert torch.equal(v, split[k]), k  # bit-exact resume under compile
    # compiled against eager: the distance is fp32 roundoff, small against how far two steps moved the weights
    moved = torch.cat([(eager[f"model.{k}"] - v).flatten() for k, v in start.model.items()]).norm()
    apart = torch.cat([(whole[f"model.{k}"] - eager[f"model.{k}"]).flatten() for k in start.model]).norm()
    print(f"compiled vs eager: {apart.item():.3e} apart, eager moved {moved.item():.3e}")
    assert moved > 0 and apart < 1e-3 * moved, (apart.item(), moved.item())
