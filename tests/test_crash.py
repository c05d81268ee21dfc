"""Fault injection: SIGKILL a training run while it writes or prunes checkpoints, then ``--resume auto``.

After every kill: every ``step_*`` folder left is a valid checkpoint (none half written or half deleted),
the next start removes the debris of the dead writer (and says so), resumes from the newest valid
checkpoint, and the run ends bit-identical to an uninterrupted one. The kills land deterministically at
the checkpoint writer's test hook (``DELTAFM_TEST_PAUSE``, see ``deltafm.train.checkpoint._test_pause``);
the slow variant adds kills at random times. A second process on a folder in use is refused.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_cases import run_cli, tree_digest
from deltafm.train.checkpoint import (
    DEBRIS_PREFIXES,
    TEST_PAUSE_ENV,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train
from deltafm.train.runfolder import LOCK_NAME, RunFolder

ROOT = Path(__file__).resolve().parents[1]
OPTS = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "log.every=1", "sample.every=-1",
        "train.ckpt_every=1", "train.keep_last=2", "log.peak_flops=1e12"]


def _env(pause: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop(TEST_PAUSE_ENV, None)
    if pause:
        env[TEST_PAUSE_ENV] = pause
    return env


def _start(out: Path, steps: int, log: Path, pause: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deltafm", "train", "--preset", "digits-tiny", *OPTS, f"train.steps={steps}",
           "--out", str(out), "--resume", "auto"]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=_env(pause), stdout=f, stderr=subprocess.STDOUT)


def _records(out: Path, kind: str) -> list[dict]:
    p = out / "log.jsonl"
    if not p.exists():
        return []
    complete = p.read_text().split("\n")[:-1]  # a line being written while we read is not complete yet
    return [r for r in map(json.loads, complete) if r["kind"] == kind]


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _wait(proc: subprocess.Popen, until, timeout: float = 180.0) -> None:
    t0 = time.time()
    while not until():
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before the kill")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("the kill point was not reached in time")
        time.sleep(0.01)


def _state_after_kill(out: Path) -> int:
    """Every step folder left is a valid checkpoint; the newest step (0 when none)."""
    steps = []
    for p in list_checkpoints(out / "checkpoints"):
        verify_checkpoint(p)  # raises on a half written / half deleted folder
        steps.append(int(p.name[5:]))
    return max(steps, default=0)


def _debris(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*")
            if p.name.startswith(DEBRIS_PREFIXES) or p.name == LOCK_NAME or ".replaced-" in p.name]


def _crash_and_resume(out: Path, steps: int, phases: list[str | None], tmp: Path) -> list[str]:
    """Run to ``steps`` with ``--resume auto``, killing the k-th run at hook ``phases[k]`` while it saves the
    step two after the newest checkpoint, or (phase None) at a random time after it took a new step. After
    each kill every step folder must be a valid checkpoint, and the next start must remove the dead
    writer's debris and resume from the newest one. Returns what each kill left: "phase@step: [debris]"."""
    hit: list[str] = []
    newest, dead = 0, []
    for i, phase in enumerate(phases):
        log = tmp / f"run{i}.txt"
        at, seen = newest + 2, len(_records(out, "train"))
        proc = _start(out, steps, log, pause=f"{phase}@{at}" if phase else None)
        try:
            if phase:
                _wait(proc, lambda log=log: "deltafm-test-pause" in log.read_text())
            else:
                _wait(proc, lambda: len(_records(out, "train")) > seen)  # a step of this run  # noqa: B023
                time.sleep(random.uniform(0.0, 0.3))
            left = [d for d in _debris(out) if any(d.endswith(f"-{pid}") for pid in dead)]
            assert left == [], f"debris of dead writers after the next start: {left}"
            _kill(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        dead.append(proc.pid)
        if newest > 0:
            assert f"resuming from {out / 'checkpoints' / f'step_{newest:08d}'};" in log.read_text()
        newest = _state_after_kill(out)
        hit.append(f"{phase or 'random'}@{at if phase else newest}: {sorted(_debris(out))}")
    final = subprocess.run([sys.executable, "-m", "deltafm", "train", "--preset", "digits-tiny", *OPTS,
                            f"train.steps={steps}", "--out", str(out), "--resume", "auto"],
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    if newest:
        assert f"resuming from {out / 'checkpoints' / f'step_{newest:08d}'};" in final.stderr, final.stderr
    assert _debris(out) == [], _debris(out)
    return hit


def _reference(tmp: Path, steps: int) -> Path:
    cfg = load_config(find_preset("digits-tiny"), [*OPTS, f"train.steps={steps}"])
    with torch.random.fork_rng(devices=[]):
        res = train(cfg, tmp / "ref")
    assert res.status == "done"
    return res.checkpoint


def _assert_same_run(ref: Path, out: Path, steps: int) -> None:
    a, b = load_checkpoint(ref), load_checkpoint(out / "checkpoints" / f"step_{steps:08d}")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model), "model weights differ"
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema), "EMA weights differ"
    la = {r["step"]: r["loss"] for r in _records(ref.parent.parent, "train")}
    lb = {r["step"]: r["loss"] for r in _records(out, "train")}
    assert la == lb, "per-step losses differ"


def test_kills_while_writing_and_pruning_checkpoints_leave_nothing_behind(tmp_path):
    steps = 8
    # checkpoints every step, keep_last 2 (saving step s prunes step s-2); each kill at the newest + 2
    hit = _crash_and_resume(tmp_path / "run", steps, ["files", "prune", "prune-partial", "complete"], tmp_path)
    # every kill left debris (a partial write, a pruned folder renamed before deletion, a complete write
    # not yet renamed), never a step folder that fails verification; the next start removed it
    assert hit[0].startswith("files@2") and "checkpoints/.tmp-step_00000002" in hit[0], hit
    assert hit[1].startswith("prune@3") and "checkpoints/.del-step_00000001" in hit[1], hit
    assert hit[2].startswith("prune-partial@5") and "checkpoints/.del-step_00000003" in hit[2], hit
    assert hit[3].startswith("complete@7") and "checkpoints/.tmp-step_00000007" in hit[3], hit
    _assert_same_run(_reference(tmp_path, steps), tmp_path / "run", steps)


def test_a_second_process_on_a_folder_in_use_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert run_cli(["train", "--preset", "digits-tiny", *OPTS, "train.steps=2", "--out", str(out)])[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from deltafm.train.runfolder import "
                               "RunFolder; RunFolder(sys.argv[1]).lock(); print('locked', flush=True); "
                               "time.sleep(600)", str(out)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_digest(out)
        second = subprocess.run([sys.executable, "-m", "deltafm", "train", "--preset", "digits-tiny", *OPTS,
                                 "train.steps=4", "--out", str(out), "--resume", "auto"],
                                env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"in use by another process (PID {holder.pid}" in errors[0]
        assert tree_digest(out) == before
        _kill(holder)
    finally:
        if holder.poll() is None:
            holder.kill()
    # the lock died with the SIGKILLed holder: the next run continues
    assert run_cli(["train", "--preset", "digits-tiny", *OPTS, "train.steps=3", "--out", str(out),
                    "--resume", "auto"])[0] == 0
    assert _debris(out) == []
    with RunFolder(out) as folder:  # and the lock is free again afterwards
        folder.lock()
        assert folder.locked


def test_resume_auto_after_an_old_style_crash_removes_incomplete_folders(tmp_path):
    """Debris of older versions: a step folder without COMPLETE (a half-deleted pruned checkpoint) and a
    temporary folder of another PID; a step folder holding foreign files is left alone and stops a resume."""
    out = tmp_path / "run"
    assert run_cli(["train", "--preset", "digits-tiny", *OPTS, "train.steps=3", "--out", str(out)])[0] == 0
    ck = out / "checkpoints"
    (ck / "step_00000002" / "COMPLETE").unlink()
    (ck / ".tmp-step_00000004-999999").mkdir()
    (ck / ".tmp-step_00000004-999999" / "model.safetensors").write_bytes(b"x")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "ste')  # a record cut by the crash
    rc, _, err = run_cli(["train", "--preset", "digits-tiny", *OPTS, "train.steps=4", "--out", str(out),
                          "--resume", "auto"])
    assert rc == 0, err
    assert "removed the debris of an interrupted run" in err and "step_00000002 (incomplete)" in err
    assert "resuming from " + str(ck / "step_00000003") in err
    assert [p.name for p in list_checkpoints(ck)] == ["step_00000003", "step_00000004"] and _debris(out) == []
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3, 4]
    # foreign files in a step folder are not debris: a resume skips the folder, sets it aside, deletes nothing
    (ck / "step_00000009").mkdir()
    torch.save({"w": torch.zeros(1)}, ck / "step_00000009" / "model.pt")
    digest = tree_digest(ck / "step_00000009")
    rc, _, err = run_cli(["train", "--preset", "digits-tiny", *OPTS, "train.steps=5", "--out", str(out),
                          "--resume", "auto"])
    assert rc == 0 and "skipping checkpoint step_00000009" in err and "set aside step_00000009" in err, err
    assert tree_digest(ck / "step_00000009.invalid-0") == digest


@pytest.mark.slow
def test_thirty_kills_at_random_and_hooked_points(tmp_path):
    """The acceptance: 30 SIGKILLs (every third at a hook phase, the others at random times while a
    checkpoint is written every step), each followed by --resume auto: no debris after the next start, no
    damaged checkpoint chosen, the final weights and every step's loss bit-exact."""
    random.seed(15)
    steps = 120
    hooks = ["files", "complete", "placed", "prune", "prune-partial"]
    phases = [hooks[(k // 3) % len(hooks)] if k % 3 == 0 else None for k in range(30)]
    out = tmp_path / "run"
    hit = _crash_and_resume(out, steps, phases, tmp_path)
    assert len(hit) == 30
    print("\n".join(hit))
    _assert_same_run(_reference(tmp_path, steps), out, steps)
