"""Optional Weights & Biases logging (``log.wandb``): config keys, a clear error without the package, what
a run sends (checked with a stand-in module, so CI needs no wandb) and, where wandb is installed, a real
offline run read back from W&B's own files."""

from __future__ import annotations

import json
import re
import struct
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from cli_cases import run_cli, tree_digest
from deltafm.train.config import ConfigError, LogConfig, find_preset, load_config
from deltafm.train.logging import WANDB_ID_FILE

FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "sample.every=-1", "log.every=1"]


def _train(out: Path, *overrides: str, resume: bool = False) -> tuple[int, str]:
    argv = ["train", "--preset", "digits-tiny", *FAST, "log.wandb=true", *overrides, "--out", str(out)]
    rc, _, err = run_cli(argv + (["--resume", "auto"] if resume else []))
    return rc, err


def _jsonl(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ------------------------------------------------------------------------------------------ config


def test_config_keys_and_their_checks():
    lg = LogConfig()
    assert (lg.wandb, lg.wandb_project, lg.wandb_mode, lg.wandb_name) == (False, "deltafm", "offline", None)
    cfg = load_config(find_preset("digits-tiny"), ["log.wandb=true", "log.wandb_mode=online", "log.wandb_name=x"])
    assert (cfg.log.wandb, cfg.log.wandb_mode, cfg.log.wandb_name) == (True, "online", "x")
    for bad, key in [("log.wandb_mode=onlin", "log.wandb_mode"), ("log.wandb_project=a/b", "log.wandb_project"),
                     ("log.wandb_project=''", "log.wandb_project"), ("log.wandb_name=' '", "log.wandb_name")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(find_preset("digits-tiny"), [bad])


def test_without_the_package_it_is_an_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    rc, err = _train(out, "train.steps=2")
    assert rc == 2, err
    assert err.splitlines()[0].startswith("error: config key 'log.wandb'"), err
    assert "deltafm[wandb]" in err and "log.wandb=false" in err
    assert not out.exists()
    # an existing run folder is left exactly as it was
    assert run_cli(["train", "--preset", "digits-tiny", *FAST, "train.steps=2", "--out", str(out)])[0] == 0
    before = tree_digest(out)
    rc, err = _train(out, "train.steps=4", resume=True)
    assert rc == 2 and err.startswith("error: config key 'log.wandb'"), err
    assert tree_digest(out) == before


# ------------------------------------------------------------------ what is sent (a stand-in module)


class _FakeConfig:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def update(self, d: dict[str, Any], allow_val_change: bool = False) -> None:
        self.data.update(d)


class _FakeRun:
    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs, self.rows, self.metrics, self.finished = kwargs, [], {}, False
        self.config = _FakeConfig()

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.metrics[name] = step_metric

    def log(self, row: dict[str, Any]) -> None:
        assert not self.finished
        self.rows.append(dict(row))

    def finish(self, exit_code: int = 0) -> None:
        self.finished, self.exit_code = True, exit_code


def _fake_wandb(runs: list[_FakeRun]) -> types.ModuleType:
    mod = types.ModuleType("wandb")
    mod.Settings = lambda **kw: kw

    def init(**kwargs):
        runs.append(_FakeRun(kwargs))
        return runs[-1]

    mod.init = init
    return mod


def test_a_run_sends_its_records_and_config_and_resumes_the_same_wandb_run(tmp_path, monkeypatch):
    runs: list[_FakeRun] = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(runs))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_CONSOLE", raising=False)
    out = tmp_path / "run"
    rc, err = _train(out, "train.steps=3", "log.wandb_project=proj")
    assert rc == 0, err
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)
    (first,) = runs
    assert first.kwargs == {"project": "proj", "name": "run", "mode": "offline", "id": run_id, "resume": "allow",
                            "dir": str(out), "settings": {"console": "off"}}
    assert first.config.data["model"]["name"] == "unet-t" and first.config.data["log"]["wandb"] is True
    assert first.metrics == {"images": None, "train/*": "images", "event/*": "images"}
    assert first.finished and first.exit_code == 0
    train_rows = [r for r in first.rows if "train/loss" in r]
    events = [r["event/message"] for r in first.rows if "event/message" in r]
    # the same records as log.jsonl
    assert [(r["step"], r["images"], r["train/loss"]) for r in train_rows] == [
        (r["step"], r["images"], r["loss"]) for r in _jsonl(out, "train")]
    assert events == [r["message"] for r in _jsonl(out, "event")] == ["start", "checkpoint", "done"]
    assert {"train/positive", "train/negative", "train/lam", "train/lr", "train/grad_norm"} <= set(train_rows[0])

    rc, err = _train(out, "train.steps=5", resume=True)
    assert rc == 0, err
    second = runs[1]
    assert second.kwargs["id"] == run_id and second.kwargs["resume"] == "allow"
    assert [r["step"] for r in second.rows if "train/loss" in r] == [4, 5]
    assert second.rows[0]["event/message"] == "resume" and second.config.data["train"]["steps"] == 5
    assert (out / WANDB_ID_FILE).read_text() == run_id + "\n"


# ---------------------------------------------------------------------- a real offline W&B run


def _records(path: Path) -> list[Any]:
    """The protobuf records of a W&B run file (``run-ID.wandb``): a 7-byte file header, then blocks of
    32 KiB holding chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) of serialised Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:8]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # zero padding at the end of a block
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _history(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(history rows, config) of one offline run folder."""
    (path,) = run_dir.glob("run-*.wandb")
    rows, config = [], {}
    for rec in _records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return rows, config


def test_a_real_offline_run_holds_the_logged_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    rc, err = _train(out, "train.steps=3")
    assert rc == 0, err
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    (first,) = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}")
    rows, config = _history(first)
    assert [(r["step"], r["images"]) for r in rows if "train/loss" in r] == [(1, 64), (2, 128), (3, 192)]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses == pytest.approx([r["loss"] for r in _jsonl(out, "train")])
    assert [r["event/message"] for r in rows if "event/message" in r] == ["start", "checkpoint", "done"]
    assert config["model"]["name"] == "unet-t"

    rc, err = _train(out, "train.steps=5", resume=True)
    assert rc == 0, err
    # W&B writes each offline start into a folder of its own, same run id (a "-1" suffix within the same second)
    runs = sorted((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(runs) == 2, runs
    rows = [r for d in runs for r in _history(d)[0]]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5]
