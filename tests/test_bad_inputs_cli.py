"""Bad-input table of ``deltafm train`` (command-line level), ``deltafm compare`` and ``deltafm toy``.

Each case runs the command in-process from a scratch folder (so a default ``runs/...`` would land there)
and expects exit status 2, exactly one ``error:`` line on stderr naming the problem (a distinctive
substring), no traceback, and the scratch folder unchanged: no file written, none created, existing run
folders untouched. No case trains or samples anything; the whole table takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cli_cases import run_cli, tree_digest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "digits-tiny.yaml"
STUDY = ROOT / "configs" / "compare" / "digits-tiny.yaml"


def _study(path: Path, **changes) -> None:
    """The tiny study with its base made absolute and ``changes`` applied (``arms0`` edits the first arm)."""
    data = yaml.safe_load(STUDY.read_text())
    data["base"] = str(TINY)
    arm = changes.pop("arms0", None)
    if arm:
        data["arms"][0].update(arm)
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """Config files and paths the cases point at; ``existing/`` stands for a run folder with results."""
    s = tmp_path_factory.mktemp("cli-bad-inputs")
    (s / "afile").write_text("not a folder\n")
    (s / "existing").mkdir()
    (s / "existing" / "keep.txt").write_text("results of an earlier run\n")
    for name in ("...yaml", "..yaml"):
        (s / name).write_text(TINY.read_text())
    (s / "garbage.yaml").write_text("model: [unclosed\n")
    (s / "list.yaml").write_text("- a\n- b\n")
    _study(s / "study-unknown-key.yaml", eval={"curve": {"nmu": 3}})
    _study(s / "study-arm-key.yaml", arms0={"overrides": {"objective.lamda": 0.1}})
    _study(s / "study-bad-map.yaml", arms0={"variants": [{"name": "fm", "map": "sideways"}]})
    _study(s / "study-budget.yaml", total_images=1000)
    _study(s / "study-classifier.yaml", eval={"classifier": str(s / "none.safetensors")})
    _study(s / "study-no-arms.yaml", arms=[])
    _study(s / "study-base.yaml", base="no-such-config")
    return s


TRAIN = ["train", "--preset", "digits-tiny"]
CMP = ["compare", "--config", str(STUDY)]

#: (id, argv with {S} for the scratch folder, substring of the error message)
CASES = [
    # deltafm train: command-line level
    ("train-out-is-file", [*TRAIN, "--out", "{S}/afile"], "--out {S}/afile is a file, not a folder"),
    ("train-out-under-file", [*TRAIN, "--out", "{S}/afile/run"], "its parent {S}/afile is a file"),
    ("train-config-three-dots", ["train", "--config", "{S}/...yaml"], "cannot name the run folder"),
    ("train-config-two-dots", ["train", "--config", "{S}/..yaml", "train.steps=1"], "pass --out DIR"),
    ("train-unknown-preset", ["train", "--preset", "no-such-preset"],
     "available: cc3m256-t2i-mmdit-d24-deltafm, digits-tiny"),
    ("train-config-missing", ["train", "--config", "{S}/none.yaml"], "config file not found"),
    ("train-config-garbage", ["train", "--config", "{S}/garbage.yaml"], "cannot parse"),
    ("train-config-list", ["train", "--config", "{S}/list.yaml"], "must be a mapping"),
    ("train-unknown-key", [*TRAIN, "train.stepz=3"], "did you mean 'train.steps'"),
    ("train-bad-value", [*TRAIN, "train.steps=many", "--dry-run"], "must be an integer"),
    ("train-override-no-value", [*TRAIN, "train.steps", "--dry-run"], "must look like key.sub=value"),
    ("train-no-config", ["train"], "give --config FILE or --preset NAME"),
    ("train-config-and-preset", [*TRAIN, "--config", str(TINY)], "not allowed with argument"),
    ("train-unknown-dataset", [*TRAIN, "data.name=cifar", "--out", "{S}/run"], "unknown dataset 'cifar'"),
    ("train-unknown-option", [*TRAIN, "--epochs", "3"], "unrecognized arguments: --epochs"),
    ("unknown-command", ["fly"], "invalid choice: 'fly'"),
    # deltafm compare
    ("cmp-config-missing", ["compare", "--config", "{S}/none.yaml"], "compare config file not found"),
    ("cmp-config-garbage", ["compare", "--config", "{S}/garbage.yaml"], "cannot parse"),
    ("cmp-unknown-key", ["compare", "--config", "{S}/study-unknown-key.yaml"], "unknown key 'eval.curve.nmu'"),
    ("cmp-arm-unknown-key", ["compare", "--config", "{S}/study-arm-key.yaml", "--out", "{S}/cmp"],
     "arm fm: unknown config key 'objective.lamda'"),
    ("cmp-bad-map", ["compare", "--config", "{S}/study-bad-map.yaml"], "map must be none, to_fm or to_delta"),
    ("cmp-budget", ["compare", "--config", "{S}/study-budget.yaml"], "must be a positive multiple"),
    ("cmp-no-arms", ["compare", "--config", "{S}/study-no-arms.yaml"], "needs 'arms'"),
    ("cmp-base-missing", ["compare", "--config", "{S}/study-base.yaml", "--dry-run"],
     "base 'no-such-config' is neither a config file"),
    ("cmp-config-classifier", ["compare", "--config", "{S}/study-classifier.yaml", "--out", "{S}/existing"],
     "eval.classifier"),
    ("cmp-unknown-arm", [*CMP, "--out", "{S}/existing", "--arms", "fm", "nope"], "unknown arm(s) ['nope']"),
    ("cmp-negative-seed", [*CMP, "--out", "{S}/existing", "--seeds", "-1"], "non-negative"),
    ("cmp-repeated-seed", [*CMP, "--seeds", "0", "0", "--dry-run"], "distinct"),
    ("cmp-seed-not-int", [*CMP, "--seeds", "one"], "invalid int value: 'one'"),
    ("cmp-threads-0", [*CMP, "--out", "{S}/existing", "--threads", "0"], "--threads must be >= 1"),
    ("cmp-out-is-file", [*CMP, "--out", "{S}/afile"], "is a file, not a folder"),
    ("cmp-classifier-missing", [*CMP, "--out", "{S}/existing", "--classifier", "{S}/none.safetensors"],
     "--classifier {S}/none.safetensors: no such file"),
    ("cmp-report-nothing", [*CMP, "--out", "{S}/existing", "--report-only"], "holds no results"),
    ("cmp-device", [*CMP, "--out", "{S}/existing", "--device", "tpu"], "--device must be auto, cpu or cuda"),
    ("cmp-no-config", ["compare", "--out", "{S}/existing"], "the following arguments are required: --config"),
    # deltafm toy
    ("toy-unknown-preset", ["toy", "--preset", "spiral", "--out", "{S}/toy"], "unknown toy preset 'spiral'"),
    ("toy-negative-seed", ["toy", "--preset", "tiny", "--seed", "-1", "--out", "{S}/toy"], "non-negative"),
    ("toy-repeated-seeds", ["toy", "--preset", "tiny", "--seeds", "1", "1", "--out", "{S}/toy"], "distinct"),
    ("toy-seed-and-seeds", ["toy", "--seed", "1", "--seeds", "2", "--out", "{S}/toy"], "not allowed with"),
    ("toy-seed-not-int", ["toy", "--seed", "x", "--out", "{S}/toy"], "invalid int value: 'x'"),
    ("toy-steps-0", ["toy", "--preset", "tiny", "--steps", "0", "--out", "{S}/toy"], "--steps must be >= 1"),
    ("toy-batch-0", ["toy", "--preset", "tiny", "--batch-size", "0", "--out", "{S}/toy"], "--batch-size must be"),
    ("toy-eval-0", ["toy", "--preset", "tiny", "--eval-per-class", "0", "--out", "{S}/toy"], "--eval-per-class"),
    ("toy-threads-0", ["toy", "--preset", "tiny", "--threads", "0", "--out", "{S}/toy"], "--threads must be >= 1"),
    ("toy-no-out", ["toy", "--preset", "tiny"], "--out DIR is required"),
    ("toy-out-is-file", ["toy", "--preset", "tiny", "--out", "{S}/afile"], "is a file, not a folder"),
    ("toy-out-under-file", ["toy", "--preset", "tiny", "--out", "{S}/afile/toy"], "is a file, not a folder"),
]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input(scratch, monkeypatch, argv, needle):
    monkeypatch.chdir(scratch)
    before = tree_digest(scratch)
    rc, _, err = run_cli([a.replace("{S}", str(scratch)) for a in argv])
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert needle.replace("{S}", str(scratch)) in err, err
    assert "Traceback" not in err
    assert tree_digest(scratch) == before


def test_run_names_from_config_files_stay_inside_runs():
    from deltafm.cli import UsageError, run_name

    assert run_name("digits-tiny", "x") == "digits-tiny"
    assert run_name("my config (v2)", "x") == "my-config-v2"
    assert run_name(".hidden", "x") == "hidden"
    for bad in ("..", ".", "", "..."):
        with pytest.raises(UsageError, match="pass --out DIR"):
            run_name(bad, "the config file name")


def test_a_bug_still_shows_its_traceback(monkeypatch):
    """Only bad input becomes an ``error:`` line; anything else propagates."""
    import deltafm.cli as cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(["train", "--preset", "digits-tiny"])
