"""Bad ``deltafm train`` inputs: each exits with 2 and one ``error:`` line naming the problem, and leaves an
existing run folder exactly as it was (same files, same sha256) and creates no new one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cli_cases import run_cli, tree_digest
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train

FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "sample.every=-1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished digits-tiny run (4 steps, checkpoints at steps 2 and 4), a pickle file and a folder
    for the cases to point at; nothing here may change."""
    root = tmp_path_factory.mktemp("bad-inputs")
    cfg = load_config(find_preset("digits-tiny"), [*FAST, "train.steps=4", "train.ckpt_every=2"])
    with torch.random.fork_rng(devices=[]):
        assert train(cfg, root / "run").status == "done"
    torch.save({"w": torch.zeros(2)}, root / "model.pt")
    (root / "typo.yaml").write_text("model:\n  name: unet-t\ntrain:\n  stpes: 3\n")
    return root


def _damaged(root: Path, how: str) -> Path:
    """A copy of the run whose checkpoints are damaged (``all``: every one; ``newest``: step 4)."""
    copy = root / f"run-{how}"
    if not copy.exists():
        shutil.copytree(root / "run", copy)
        for step in (2, 4) if how == "all" else (4,):
            f = copy / "checkpoints" / f"step_{step:08d}" / "model.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return copy


PRESET = ["train", "--preset", "digits-tiny", *FAST]
#: (id, argv with {run} {root}, words the error line must contain, run folder the case points at)
CASES = [
    ("unknown-key", [*PRESET, "optim.lrr=1", "--resume", "auto"], ["unknown config key 'optim.lrr'", "'optim.lr'"]),
    ("unknown-section", [*PRESET, "optimm.lr=1"], ["unknown config key 'optimm'"]),
    ("wrong-type", [*PRESET, "train.steps=abc"], ["train.steps"]),
    ("unparsable-value", [*PRESET, "optim.betas=[0.9"], ["optim.betas", "cannot parse"]),
    ("not-an-override", [*PRESET, "optim.lr"], ["'optim.lr'", "key.sub=value"]),
    ("lam-1", [*PRESET, "objective.lam=1.0", "--resume", "auto"], ["objective.lam", "0 <= lam < 1"]),
    ("lam-negative", [*PRESET, "objective.lam=-0.1"], ["objective.lam"]),
    ("lam-schedule-key", [*PRESET, "objective.lam_schedule={kind: linear, strat: 0}"],
     ["objective.lam_schedule.strat", "did you mean"]),
    ("lr-negative", [*PRESET, "optim.lr=-1"], ["optim.lr", "positive"]),
    ("batch-0", [*PRESET, "train.batch_size=0"], ["train.batch_size", ">= 1"]),
    ("batch-1", [*PRESET, "train.batch_size=1", "--resume", "auto"],
     ["train.batch_size", "negatives", ">= 2", "objective.negatives=none"]),
    ("micro-batch-1", [*PRESET, "train.batch_size=4", "train.grad_accum=4", "--resume", "auto"],
     ["train.batch_size", "train.grad_accum", "negatives", ">= 8"]),
    ("batch-indivisible", [*PRESET, "train.batch_size=6", "train.grad_accum=4"], ["train.batch_size", "divisible"]),
    ("batch-over-dataset", [*PRESET, "train.batch_size=4096", "--resume", "auto"],
     ["train.batch_size", "dataset size"]),
    ("two-durations", [*PRESET, "train.total_images=100"], ["train.total_images", "exactly one"]),
    ("keep-last-0", [*PRESET, "train.keep_last=0"], ["train.keep_last"]),
    ("bad-device", [*PRESET, "train.device=tpu"], ["train.device"]),
    ("bad-solver", [*PRESET, "sample.solver=eulr"], ["sample.solver", "'euler'"]),
    ("unknown-dataset", [*PRESET, "data.name=imagenett", "--resume", "auto"], ["imagenett"]),
    ("bad-data-root-on-resume", ["train", "--resume", "auto", "data.name=mnist", "data.root={root}/nowhere"],
     ["{root}/nowhere"]),
    ("model-cannot-take-data", [*PRESET, "model.name=SiT-N/2", "model.kwargs.patch_size=3", "--resume", "auto"],
     ["SiT-N/2", "patch size 3"]),
    ("unknown-model", [*PRESET, "model.name=unet-zz", "--resume", "auto"], ["unet-zz"]),
    ("unknown-preset", ["train", "--preset", "digits-tinyy"], ["no preset 'digits-tinyy'", "'digits-tiny'"]),
    ("missing-config-file", ["train", "--config", "{root}/none.yaml"], ["{root}/none.yaml"]),
    ("typo-in-config-file", ["train", "--config", "{root}/typo.yaml"], ["train.stpes", "'train.steps'"]),
    ("no-config", ["train"], ["--config", "--preset"]),
    ("occupied-without-resume", [*PRESET], ["already holds checkpoints", "--resume auto"]),
    ("resume-path-missing", [*PRESET, "--resume", "{root}/nope"], ["checkpoint not found", "{root}/nope"]),
    ("resume-pickle", [*PRESET, "--resume", "{root}/model.pt"], ["pickle", "refusing"]),
    ("resume-path-truncated", [*PRESET, "--resume", "{run}/checkpoints/step_00000004"], ["truncated"], "newest"),
    ("resume-other-model", [*PRESET, "model.name=unet-s", "--resume", "{run}/checkpoints/step_00000004"],
     ["does not fit model 'unet-s'"]),
    ("every-checkpoint-invalid", [*PRESET, "--resume", "auto"],
     ["no valid checkpoint", "step_00000004", "step_00000002", "truncated", "another --out"], "all"),
    ("locked-folder", [*PRESET, "--resume", "auto"], ["in use", "PID", "another --out"], "locked"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_train_input(base, case):
    from deltafm.train.runfolder import RunFolder

    name, argv, needles, *where = case
    run = _damaged(base, where[0]) if where and where[0] in ("all", "newest") else base / "run"
    if not any(a == "--out" for a in argv):
        argv = [*argv, "--out", "{run}"]
    argv = [a.replace("{run}", str(run)).replace("{root}", str(base)) for a in argv]
    before = tree_digest(base)
    holder = RunFolder(run) if where == ["locked"] else None
    if holder is not None:
        holder.lock()  # this process holds the lock; the command opens the lock file anew and must fail
    try:
        rc, out, err = run_cli(argv)
    finally:
        if holder is not None:
            holder.release()
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n.replace("{root}", str(base)) in errors[0], errors[0]
    assert tree_digest(base) == before, f"{name} changed files"


def test_the_per_process_micro_batch_is_checked_with_the_world_size():
    """Under torchrun the pool of negatives is the per-process micro-batch: 2 processes x batch 2 leave 1."""
    from deltafm.train.config import ConfigError
    from deltafm.train.distributed import DistInfo
    from deltafm.train.setup import _check_negative_pool

    two = DistInfo(0, 2, 0, torch.device("cpu"))
    cfg = load_config(find_preset("digits-tiny"), ["train.batch_size=4", "train.grad_accum=2"])
    _check_negative_pool(cfg, DistInfo())  # one process: pools of 2
    with pytest.raises(ConfigError) as e:
        _check_negative_pool(cfg, two)
    for needle in ("train.batch_size", "train.grad_accum", "1 sample per process", ">= 8", "gather_negatives"):
        assert needle in str(e.value), str(e.value)
    for fix in (["objective.gather_negatives=true"], ["objective.negatives=none"], ["train.batch_size=8"]):
        _check_negative_pool(load_config(find_preset("digits-tiny"), ["train.batch_size=4", "train.grad_accum=2",
                                                                        *fix]), two)
