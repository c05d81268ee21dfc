"""Checkpoints: exact round trips without pickle, atomic writes, keep-last-k, validation, pickle refusal."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from deltafm.train import checkpoint as ck
from deltafm.train.checkpoint import (
    CheckpointError,
    PickleCheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    pack_state,
    resolve_checkpoint,
    save_checkpoint,
    unpack_state,
    verify_checkpoint,
)


def _eq(a, b) -> bool:
    """Deep equality that compares tensors / arrays exactly (dtype included) and containers by type."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_pack_unpack_round_trip_is_exact_and_json_only():
    g = torch.Generator().manual_seed(3)
    state = {
        "step": 7,
        "lr": 1e-4,
        "flags": [True, None, "x"],
        "inf": float("inf"),
        "nan": float("nan"),
        "int_keys": {0: {"exp_avg": torch.randn(3, generator=g)}, 5: {"step": torch.tensor(2.0)}},
        "tuple": (1, (2.5, "a")),
        "numpy": np.random.RandomState(0).get_state(),
        "python": random.Random(1).getstate(),
        "gen": g.get_state(),
        "bf16": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "__weird": 1,
    }
    skeleton, tensors = pack_state(state)
    text = json.dumps(skeleton, allow_nan=False)  # JSON-able, no NaN literals
    back = unpack_state(json.loads(text), tensors)
    assert _eq(back, state)


def test_pack_rejects_arbitrary_objects():
    with pytest.raises(TypeError, match="cannot store an object of type"):
        pack_state({"fn": object()})


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))


def _state(model: torch.nn.Module, step: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    return {"step": step, "images_seen": 10 * step, "optimizer": opt.state_dict(), "rng": [torch.get_rng_state()]}


def test_save_load_round_trip_restores_an_optimizer_exactly(tmp_path):
    m = _model()
    state = _state(m, 3)
    path = save_checkpoint(tmp_path, 3, m.state_dict(), state, ema={k: v * 2 for k, v in m.state_dict().items()})
    assert path.name == "step_00000003" and (path / "COMPLETE").is_file()
    c = load_checkpoint(path)
    assert c.step == 3 and _eq(c.state, state)
    assert all(torch.equal(c.model[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(c.ema[k], 2 * v) for k, v in m.state_dict().items())
    # the restored optimizer continues exactly like the original
    m2 = _model()
    m2.load_state_dict(c.model)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(c.state["optimizer"])
    opt1 = torch.optim.AdamW(m.parameters(), lr=1e-3)
    opt1.load_state_dict(state["optimizer"])
    x = torch.randn(5, 4)
    for mm, oo in ((m, opt1), (m2, opt2)):
        oo.zero_grad()
        mm(x).square().mean().backward()
        oo.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_tied_weights_are_saved(tmp_path):
    lin = torch.nn.Linear(3, 3)
    sd = {"a": lin.weight, "b": lin.weight}  # shared storage: safetensors alone would refuse
    save_checkpoint(tmp_path, 1, sd, {"step": 1})
    c = load_checkpoint(tmp_path / "step_00000001")
    assert torch.equal(c.model["a"], c.model["b"])


def test_keep_last_k_and_stale_tmp_folders(tmp_path):
    m = _model()
    for s in range(1, 6):
        save_checkpoint(tmp_path, s, m.state_dict(), {"step": s}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_crash_while_writing_leaves_no_checkpoint(tmp_path, monkeypatch):
    m = _model()
    save_checkpoint(tmp_path, 1, m.state_dict(), {"step": 1})
    real = ck.save_file

    def failing(tensors, filename, metadata=None):
        if filename.endswith("state.safetensors"):
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, m.state_dict(), {"step": 2})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000001"


def _three(tmp_path: Path) -> list[Path]:
    m = _model()
    return [save_checkpoint(tmp_path, s, m.state_dict(), {"step": s}) for s in (1, 2, 3)]


def test_truncated_tampered_and_incomplete_checkpoints_are_detected(tmp_path):
    p1, p2, p3 = _three(tmp_path)
    verify_checkpoint(p1)
    # truncated weights
    f = p3 / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(p3)
    # tampered state (same size, one byte changed)
    f = p2 / "state.json"
    data = bytearray(f.read_bytes())
    i = data.index(b": 2")
    data[i : i + 3] = b": 9"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(p2)
    warnings: list[str] = []
    assert find_latest_checkpoint(tmp_path, warnings.append) == p1
    assert len(warnings) == 2 and "step_00000003" in warnings[0] and "step_00000002" in warnings[1]
    # a manifest edited to match the tampered file no longer matches the COMPLETE marker
    man = json.loads((p2 / "manifest.json").read_text())
    man["files"]["state.json"]["sha256"] = ck._sha256(p2 / "state.json")
    (p2 / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True))
    with pytest.raises(CheckpointError, match="COMPLETE marker"):
        verify_checkpoint(p2)
    # no COMPLETE marker: interrupted while writing
    (p1 / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(p1)
    assert find_latest_checkpoint(tmp_path, warnings.append) is None
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        resolve_checkpoint(tmp_path, warnings.append)


def test_resolve_accepts_run_folders_step_folders_and_files(tmp_path):
    run = tmp_path / "run"
    _, _, p3 = _three(run / "checkpoints")
    assert resolve_checkpoint(run) == p3
    assert resolve_checkpoint(run / "checkpoints") == p3
    assert resolve_checkpoint(p3) == p3
    assert resolve_checkpoint(p3 / "model.safetensors") == p3
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope")


def test_set_aside_moves_newer_folders_without_deleting(tmp_path):
    from deltafm.train.runfolder import RunFolder

    _three(tmp_path / "checkpoints")
    with RunFolder(tmp_path) as folder:
        folder.open(lambda m: None)
        moved = folder.set_aside_newer(1, lambda m: None)
    assert sorted(p.name for p in moved) == ["step_00000002.invalid-0", "step_00000003.invalid-0"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001"]
    assert all((p / "model.safetensors").is_file() for p in moved)


class _Boom:
    """Unpickling this object would create a marker file: a loader must never do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"w": _Boom(str(marker))}))
    zipped = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, zipped)
    folder = tmp_path / "old_run"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(evil.read_bytes())
    for target in (evil, zipped, folder):
        with pytest.raises(PickleCheckpointError, match="pickle"):
            resolve_checkpoint(target)
        with pytest.raises(PickleCheckpointError, match="refusing to load"):
            verify_checkpoint(target)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ the run state


def test_the_run_state_owns_the_checkpoint_keys_and_round_trips(tmp_path):
    from deltafm.train.state import CHECKPOINT_KEYS, RunState, capture_rng, restore_rng

    assert CHECKPOINT_KEYS == ("step", "images_seen", "world_size", "config", "data", "optimizer", "scaler",
                               "sampler", "rng", "mean_target", "lam", "reason")
    m = _model()
    opt_state = _state(m, 3)["optimizer"]
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(5)
    random.random(), np.random.rand(), torch.rand(1)
    st = RunState(step=3, images_seen=30, world_size=1, config={"train": {"seed": 0}}, data={"name": "d"},
                  optimizer=opt_state, sampler={"epoch": 0, "batch_in_epoch": 3}, rng=[capture_rng(gen, cpu)],
                  mean_target={"count": torch.arange(3.0, dtype=torch.float64)}, lam=0.05, reason="periodic")
    draws = (random.random(), float(np.random.rand()), torch.rand(2), torch.rand(2, generator=gen))
    path = save_checkpoint(tmp_path, 3, m.state_dict(), st.to_checkpoint())
    assert list(json.loads((path / "state.json").read_text())) == list(CHECKPOINT_KEYS)  # the on-disk order
    back = RunState.from_checkpoint(load_checkpoint(path).state)
    assert _eq(back.to_checkpoint(), st.to_checkpoint())
    # the saved streams continue exactly where they were captured
    gen2 = torch.Generator()
    restore_rng(back.rng_of(0, 1), gen2, cpu)
    again = (random.random(), float(np.random.rand()), torch.rand(2), torch.rand(2, generator=gen2))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])
    assert back.rng_of(0, 2) is None  # another world size: streams are re-derived
    # a weights-only load (for sampling) has no optimizer or scaler; older states may lack keys
    light = RunState.from_checkpoint(load_checkpoint(path, weights_only=True).state)
    assert light.optimizer is None and light.scaler is None and light.step == 3 and light.lam == 0.05
    assert RunState.from_checkpoint({"step": 2, "images_seen": 20}).mean_target is None


# ------------------------------------------------------------------------------------ the run folder


def test_pruning_renames_before_deleting(tmp_path, monkeypatch):
    """A crash while a pruned checkpoint is deleted leaves a .del-* folder, never a half-empty step_*."""
    m = _model()
    for s in (1, 2):
        save_checkpoint(tmp_path, s, m.state_dict(), {"step": s}, keep_last=2)

    def crash(path, *args, **kwargs):
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(ck.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, m.state_dict(), {"step": 3}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert all(verify_checkpoint(p) for p in list_checkpoints(tmp_path))
    assert [p.name for p in tmp_path.glob(".del-*")] == [f".del-step_00000001-{os.getpid()}"]


def test_remove_debris(tmp_path):
    from deltafm.train.runfolder import remove_debris

    ck_root = tmp_path / "checkpoints"
    m = _model()
    p1, p2 = (save_checkpoint(ck_root, s, m.state_dict(), {"step": s}) for s in (1, 2))
    (p1 / "COMPLETE").unlink()  # half deleted by an older version: debris
    os.replace(p2, ck_root / "step_00000002.replaced-7")  # killed while rewriting step 2: put back
    (ck_root / ".tmp-step_00000003-7").mkdir()
    (ck_root / "step_00000004").mkdir()
    (ck_root / "step_00000004" / "notes.txt").write_text("mine")  # foreign: never removed
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".tmp-7-step_00000002.png").write_bytes(b"png")
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"st')
    removed = remove_debris(tmp_path)
    assert len(removed) == 5 and "checkpoints/step_00000001 (incomplete)" in removed
    assert sorted(p.name for p in ck_root.iterdir()) == ["step_00000002", "step_00000004"]
    verify_checkpoint(ck_root / "step_00000002")
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert list((tmp_path / "samples").iterdir()) == []
    assert remove_debris(tmp_path) == []


def test_the_lock_is_exclusive_and_leaves_no_file(tmp_path):
    from deltafm.train.builders import SetupError
    from deltafm.train.runfolder import LOCK_NAME, RunFolder

    a, b = RunFolder(tmp_path), RunFolder(tmp_path)
    a.lock()
    assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with pytest.raises(SetupError, match=f"in use by this process \\(PID {os.getpid()}"):
        b.lock()
    with pytest.raises(RuntimeError, match="open"):
        a.write_text("config.yaml", "x")  # nothing is written before open()
    a.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with b:
        b.open(lambda m: None)
        path = b.write_text("config.yaml", "a: 1\n")
        before = path.stat().st_mtime_ns
        b.write_text("config.yaml", "a: 1\n")  # identical: not rewritten
        assert path.stat().st_mtime_ns == before and path.read_text() == "a: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
