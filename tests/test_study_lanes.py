"""scripts/study_lanes.sh: units run in order, each finished one's record is saved at once, saved records are
restored before a study's first unit, a failing unit stops the lane, bad lane files stop it before anything
runs. The study runner is replaced by a stub interpreter (the real one is tested in test_compare.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB = """#!{python}
# stands in for `python -m deltafm.study ... --arms ARM --seeds SEED --no-report --quiet`
import json, os, sys
from pathlib import Path
a = sys.argv[1:]
assert a[:2] == ["-m", "deltafm.study"], a
opt = {{a[i]: a[i + 1] for i in range(2, len(a) - 1) if a[i].startswith("--")}}
out, arm, seed = Path(opt["--out"]), opt["--arms"], opt["--seeds"]
restored = sorted(str(p.relative_to(out)) for p in out.glob("results/*/seed*.json"))
with open("calls.jsonl", "a") as f:
    f.write(json.dumps({{"config": opt["--config"], "arm": arm, "seed": seed, "seen": restored,
                        "threads": os.environ.get("OMP_NUM_THREADS"), "flags": [x for x in a if x in
                        ("--no-report", "--quiet")]}}) + "\\n")
if arm == "broken":
    sys.exit(3)
rec = out / "results" / arm / f"seed{{seed}}.json"
rec.parent.mkdir(parents=True, exist_ok=True)
rec.write_text(json.dumps({{"arm": arm, "seed": int(seed), "status": "done"}}))
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the two scripts in a bare project tree with two study configs and the stub interpreter."""
    for name in ("study_lanes.sh", "study_records.sh"):
        (tmp_path / "scripts").mkdir(exist_ok=True)
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    (tmp_path / "configs" / "compare").mkdir(parents=True)
    for study in ("alpha", "beta"):
        (tmp_path / "configs" / "compare" / f"{study}.yaml").write_text(f"name: {study}\n")
    stub = tmp_path / "stub-python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def run_lane(tree: Path, text: str) -> subprocess.CompletedProcess[str]:
    lane = tree / "lane.txt"
    lane.write_text(text)
    env = {**os.environ, "PY": str(tree / "stub-python"), "OMP_NUM_THREADS": "4"}
    return subprocess.run(["bash", str(tree / "scripts" / "study_lanes.sh"), str(lane)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=60)


def calls(tree: Path) -> list[dict]:
    path = tree / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_units_run_in_order_and_each_record_is_saved(tree: Path) -> None:
    r = run_lane(tree, "# a comment\nalpha fm 0\n\nalpha dfm 0   # trailing comment\nbeta fm 2\n")
    assert r.returncode == 0, r.stderr
    got = [(c["config"], c["arm"], c["seed"]) for c in calls(tree)]
    assert got == [("configs/compare/alpha.yaml", "fm", "0"), ("configs/compare/alpha.yaml", "dfm", "0"),
                   ("configs/compare/beta.yaml", "fm", "2")]
    assert all(c["threads"] == "1" and c["flags"] == ["--no-report", "--quiet"] for c in calls(tree))
    kept = tree / "docs" / "figures" / "compare"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("seed*.json")) == [
        "alpha-units/dfm/seed0.json", "alpha-units/fm/seed0.json", "beta-units/fm/seed2.json"]
    assert "unit 3/3: beta fm seed 2" in r.stdout and "finished" in r.stdout


def test_saved_records_are_restored_before_a_studys_first_unit(tree: Path) -> None:
    kept = tree / "docs" / "figures" / "compare" / "alpha-units" / "fm"
    kept.mkdir(parents=True)
    (kept / "seed0.json").write_text("{}")
    r = run_lane(tree, "alpha dfm 0\nbeta fm 0\n")
    assert r.returncode == 0, r.stderr
    first, second = calls(tree)
    assert first["seen"] == ["results/fm/seed0.json"]      # the fresh tree got the saved record back
    assert second["seen"] == []                            # beta had nothing saved
    assert (tree / "runs" / "compare" / "alpha" / "results" / "fm" / "seed0.json").read_text() == "{}"


def test_a_failing_unit_stops_the_lane_and_keeps_the_earlier_records(tree: Path) -> None:
    r = run_lane(tree, "alpha fm 0\nalpha broken 0\nalpha dfm 0\n")
    assert r.returncode == 3
    assert "failed (status 3)" in r.stderr and "runs/logs/alpha-broken-0.log" in r.stderr
    assert [c["arm"] for c in calls(tree)] == ["fm", "broken"]
    assert (tree / "docs" / "figures" / "compare" / "alpha-units" / "fm" / "seed0.json").exists()


@pytest.mark.parametrize("text, message", [
    ("alpha fm\n", "lane.txt:1: expected 'NAME ARM SEED', got 'alpha fm'"),
    ("alpha fm 0\nalpha dfm one\n", "lane.txt:2: expected 'NAME ARM SEED'"),
    ("alpha fm 0 extra\n", "lane.txt:1: expected"),
    ("alpha fm 0\ngamma fm 0\n", "lane.txt:2: no study config configs/compare/gamma.yaml"),
    ("# nothing\n\n", "names no unit"),
])
def test_bad_lane_files_stop_before_anything_runs(tree: Path, text: str, message: str) -> None:
    r = run_lane(tree, text)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and message in r.stderr
    assert calls(tree) == []


def test_missing_lane_file(tree: Path) -> None:
    r = subprocess.run(["bash", str(tree / "scripts" / "study_lanes.sh"), str(tree / "nope.txt")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: no lane file" in r.stderr


@pytest.mark.parametrize("lane", sorted((ROOT / "scripts" / "lanes").glob("*.txt")))
def test_shipped_lanes_name_existing_arms(lane: Path) -> None:
    """Every unit of a shipped lane file is an arm and seed of its study's config."""
    import yaml

    seen = set()
    for line in lane.read_text().splitlines():
        f = line.split("#", 1)[0].split()
        if not f:
            continue
        name, arm, seed = f
        cfg = yaml.safe_load((ROOT / "configs" / "compare" / f"{name}.yaml").read_text())
        assert arm in [a["name"] for a in cfg["arms"]], (lane.name, line)
        assert int(seed) in cfg["seeds"], (lane.name, line)
        assert (name, arm, seed) not in seen, (lane.name, line)
        seen.add((name, arm, seed))


def test_issue13_lanes_cover_each_remaining_study_once() -> None:
    """Lanes A and B together run every (arm, seed) of the convergence, λ and batch studies exactly once."""
    import yaml

    units = []
    for lane in ("issue13-a.txt", "issue13-b.txt"):
        for line in (ROOT / "scripts" / "lanes" / lane).read_text().splitlines():
            if f := line.split("#", 1)[0].split():
                units.append((f[0], f[1], int(f[2])))
    want = []
    for name in ("fmnist-unet-convergence", "fmnist-unet-lambda", "fmnist-unet-batch-steps"):
        cfg = yaml.safe_load((ROOT / "configs" / "compare" / f"{name}.yaml").read_text())
        want += [(name, a["name"], s) for a in cfg["arms"] for s in cfg["seeds"]]
    assert sorted(units) == sorted(want)
