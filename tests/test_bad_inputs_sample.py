"""Bad ``deltafm sample`` input: exit status 2, one ``error:`` line naming the problem, no traceback, and every
existing folder left exactly as it was (nothing sampled, nothing created)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cli_cases import run_cli, tree_digest
from deltafm.sample_cli import WORK_DIR
from deltafm.sample_store import ChunkStore
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-sample") / "run"
    cfg = load_config(find_preset("digits-tiny"), ["log.progress_bar=false", "log.tensorboard=false",
                                                   "train.threads=1", "sample.every=-1", "train.steps=2",
                                                   "train.ckpt_every=2"])
    with torch.random.fork_rng(devices=[]):
        assert train(cfg, out).status == "done"
    return out


@dataclass
class Ctx:
    run: Path
    tmp: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"


class _Killed(Exception):
    pass


def _unfinished(ctx: Ctx, monkeypatch) -> None:
    """An out folder left by a run killed after two chunks (--num 20 --batch-size 4 --steps 2)."""
    real, calls = ChunkStore.write, []

    def dying(self, start, items):
        real(self, start, items)
        calls.append(start)
        if len(calls) == 2:
            raise _Killed

    monkeypatch.setattr(ChunkStore, "write", dying)
    with pytest.raises(_Killed):
        run_cli(["sample", "--ckpt", str(ctx.run), "--out", str(ctx.out), "--num", "20", "--batch-size", "4",
                 "--steps", "2", "--threads", "1", "--no-progress"])
    monkeypatch.undo()
    assert len(list((ctx.out / WORK_DIR).glob("chunk_*.npy"))) == 2


def _file(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _pickle(ctx: Ctx) -> str:
    pt = ctx.tmp / "model.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    return str(pt)


def _truncated(ctx: Ctx) -> str:
    import shutil

    copy = ctx.tmp / "runcopy"
    shutil.copytree(ctx.run, copy)
    step = sorted((copy / "checkpoints").glob("step_*"))[-1]
    f = step / "ema.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return str(step)


def _garbage(ctx: Ctx) -> str:
    d = ctx.tmp / "garbage" / "step_00000002"
    _file(d / "model.safetensors", b"\x00garbage")
    _file(d / "manifest.json", b"{not json")
    return str(d)


Setup = Callable[[Ctx, object], list[str]]


def _opts(*args: str) -> Setup:
    return lambda ctx, mp: ["--ckpt", str(ctx.run), "--out", str(ctx.out), *args]


def _ckpt(make: Callable[[Ctx], str]) -> Setup:
    return lambda ctx, mp: ["--ckpt", make(ctx), "--out", str(ctx.out)]


def _out_is_a_file(ctx: Ctx, mp) -> list[str]:
    return ["--ckpt", str(ctx.run), "--out", str(_file(ctx.out))]


def _out_below_a_file(ctx: Ctx, mp) -> list[str]:
    return ["--ckpt", str(ctx.run), "--out", str(_file(ctx.tmp / "plain") / "sub")]


def _npz_is_a_folder(ctx: Ctx, mp) -> list[str]:
    (ctx.out / "samples.npz").mkdir(parents=True)
    _file(ctx.out / "samples.npz" / "keep.txt")
    return ["--ckpt", str(ctx.run), "--out", str(ctx.out)]


def _no_mean_target(ctx: Ctx, mp) -> list[str]:
    """A checkpoint without a stored mean target (as one converted from public weights)."""
    from deltafm.objective import DeltaFMObjective

    mp.setattr(DeltaFMObjective, "load_state_dict", lambda self, state: None)
    return ["--ckpt", str(ctx.run), "--out", str(ctx.out), "--map", "to_fm"]


def _resumed_with(*changed: str) -> Setup:
    def setup(ctx: Ctx, mp) -> list[str]:
        _unfinished(ctx, mp)
        base = {"--num": "20", "--batch-size": "4", "--steps": "2"}
        for flag, value in zip(changed[::2], changed[1::2]):
            base[flag] = value
        return ["--ckpt", str(ctx.run), "--out", str(ctx.out), *[x for k, v in base.items() for x in (k, *v.split())]]
    return setup


CASES: list[tuple[str, Setup, str]] = [
    ("cfg-nan", _opts("--cfg", "nan"), "--cfg must be a finite number >= 0"),
    ("cfg-inf", _opts("--cfg", "inf"), "--cfg must be a finite number >= 0"),
    ("cfg-negative", _opts("--cfg", "-1"), "got -1.0"),
    ("steps-0", _opts("--steps", "0"), "--steps must be >= 1"),
    ("sde-steps-1", _opts("--solver", "sde", "--steps", "1"), "--steps must be >= 2 for the sde solver"),
    ("interval-reversed", _opts("--guidance-interval", "0.7", "0.2"), "0 <= LO <= HI <= 1"),
    ("interval-out-of-range", _opts("--guidance-interval", "-0.1", "1"), "--guidance-interval"),
    ("interval-nan", _opts("--guidance-interval", "nan", "1"), "--guidance-interval"),
    ("num-0", _opts("--num", "0"), "--num must be >= 1"),
    ("num-not-a-number", _opts("--num", "many"), "invalid int value: 'many'"),
    ("batch-0", _opts("--batch-size", "0"), "--batch-size must be >= 1"),
    ("threads-0", _opts("--threads", "0"), "--threads must be >= 1"),
    ("seed-negative", _opts("--seed", "-1"), "--seed must be >= 0"),
    ("class-too-large", _opts("--class", "10"), "--class 10 is out of range: the model has classes 0 .. 9"),
    ("class-negative", _opts("--class", "-2"), "--class must be a class id >= 0"),
    ("unknown-solver", _opts("--solver", "rk45"), "invalid choice: 'rk45'"),
    ("bad-device", _opts("--device", "gpu0"), "--device 'gpu0'"),
    ("too-many-samples-for-the-disk", _opts("--num", str(10**13)), "GiB free"),
    ("out-is-a-file", _out_is_a_file, "exists and is not a folder"),
    ("out-below-a-file", _out_below_a_file, "is a file, not a folder"),
    ("npz-name-is-a-folder", _npz_is_a_folder, "samples.npz is a folder"),
    ("ckpt-missing", lambda ctx, mp: ["--ckpt", str(ctx.tmp / "nope"), "--out", str(ctx.out)], "not found"),
    ("ckpt-garbage", _ckpt(_garbage), "step_00000002"),
    ("ckpt-pickle", _ckpt(_pickle), "pickle"),
    ("ckpt-truncated", _ckpt(_truncated), "truncated"),
    ("ckpt-garbage-file", lambda ctx, mp: ["--ckpt", str(_file(ctx.tmp / "weights.dat")), "--out", str(ctx.out)],
     "not a deltafm checkpoint"),
    ("resumed-with-other-cfg", _resumed_with("--cfg", "2"), "cfg: 1.0 there, 2.0 now"),
    ("resumed-with-other-batch", _resumed_with("--batch-size", "5"), "batch_size: 4 there, 5 now"),
    ("resumed-with-other-num", _resumed_with("--num", "21"), "other settings (num: 20 there, 21 now)"),
    ("resumed-with-other-map", _resumed_with("--map", "none"), 'map: "to_fm" there, "none" now'),
    ("resumed-with-other-lam", _resumed_with("--map", "to_delta", "--lam", "0.1"), 'map_lam: 0.05 there, 0.1 now'),
    ("unknown-map", _opts("--map", "to_x"), "invalid choice: 'to_x'"),
    ("map-and-alias-disagree", _opts("--map", "none", "--bias-correction", "on"), "disagree"),
    ("lam-without-map", _opts("--lam", "0.05"), "--lam is only for --map to_delta"),
    ("lam-with-to-fm", _opts("--map", "to_fm", "--lam", "0.05"), "--lam is only for --map to_delta (got --map to_fm)"),
    ("to-delta-without-lam", _opts("--map", "to_delta"), "--map to_delta needs --lam"),
    ("lam-1", _opts("--map", "to_delta", "--lam", "1"), "--lam must satisfy 0 < lam < 1"),
    ("lam-0", _opts("--map", "to_delta", "--lam", "0"), "--lam must satisfy 0 < lam < 1"),
    ("lam-nan", _opts("--map", "to_delta", "--lam", "nan"), "--lam must satisfy 0 < lam < 1"),
    ("to-fm-without-mean-target", _no_mean_target, "--map to_fm: checkpoint"),
    ("correction-without-map", _opts("--map", "none", "--correction", "guidance"), "--correction guidance needs a map"),
    ("correction-and-alias-disagree", _opts("--bias-correction", "guidance", "--correction", "always"),
     "--correction always and --bias-correction guidance (--map to_fm --correction guidance) disagree"),
    ("unknown-bias-correction", _opts("--bias-correction", "sometimes"), "invalid choice: 'sometimes'"),
    ("resumed-with-other-window", _resumed_with("--guidance-interval", "0.3 1", "--correction", "guidance"),
     "map_window: [0.0, 1.0] there, [0.3, 1.0] now"),
]


def _snapshot(ctx: Ctx) -> tuple[dict[str, str], dict[str, str], list[str]]:
    return tree_digest(ctx.run), tree_digest(ctx.tmp), sorted(str(p) for p in ctx.tmp.rglob("*"))


@pytest.mark.parametrize("setup,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_sample_input_is_one_clear_error_and_changes_nothing(run, tmp_path, monkeypatch, setup, needle):
    ctx = Ctx(run, tmp_path)
    args = setup(ctx, monkeypatch)
    before = _snapshot(ctx)
    rc, out, err = run_cli(["sample", "--no-progress", *args])
    assert rc == 2, err
    assert "Traceback" not in err and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert needle in errors[0], err
    assert _snapshot(ctx) == before  # same files, same bytes, no new folder


def test_the_table_is_large_enough():
    assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)
