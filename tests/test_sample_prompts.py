"""``deltafm sample`` for text-to-image and multi-condition models: prompts and condition values in, a captioned
grid, samples.npz with each sample's prompt (values) and sample.json out; the samples are those of
``generate`` with the encoded prompts (compositional weights), a killed run resumes to the same bytes, and
bad input is one ``error:`` line that writes nothing."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_cases import run_cli, tree_digest
from deltafm.conditioning import Indexed, Labels, MultiCond, batch_size, select
from deltafm.generate import generate
from deltafm.pixels import to_uint8_nhwc
from deltafm.sample_cli import WORK_DIR
from deltafm.sample_store import ChunkStore
from deltafm.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from deltafm.train.conditions import Conditions
from deltafm.train.config import find_preset, load_config
from deltafm.train.loop import train
from deltafm.train.restore import load_for_sampling
from tiny_text import shapes_words, tiny_bert

ROOT = Path(__file__).resolve().parents[1]
FAST = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "sample.every=-1", "train.batch_size=16",
        "data.max_items=64", "data.image_size=16", "train.steps=2", "train.ckpt_every=2"]
A, B = "a small red circle", "two blue squares"
VALUES = "circle, square, triangle, diamond, cross"


def _train(cfg, out: Path) -> Path:
    with torch.random.fork_rng(devices=[]):
        assert train(cfg, out).status == "done"
    return out


def _jitter(run: Path) -> Path:
    """Rewrite the run's checkpoint with its EMA weights jittered (seeded): after 2 steps the adaLN-zero layers
    are still about zero and the condition barely moves a sample; jittered, another prompt or weight gives
    other images, so comparing images tests which condition each sample got."""
    path = list_checkpoints(run / "checkpoints")[-1]
    c = load_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    ema = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in c.ema.items()}
    save_checkpoint(path.parent, c.step, c.model, c.state, ema)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny runs of 2 steps: text (MMDiT, tiny BERT), multi (SiT on shape and colour, a checkpoint guidance
    weight for colour) and class (digits), plus a second BERT of other weights."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("prompts")
    words = shapes_words()
    bert = tiny_bert(root / "bert", words, 0)
    text = ["data.name=shapes-scenes", "model.name=MMDiT-N/4", "conditioning.kind=text",
            f"conditioning.text_encoder={bert}", "conditioning.max_tokens=48", "objective.label_dropout=0.2"]
    multi = ["data.name=shapes", "model.name=SiT-N/4", "conditioning.kind=multi", "conditioning.parts=[shape, colour]",
             "conditioning.contrast_on=shape", "objective.negatives=different_class", "conditioning.joint_dropout=0.1",
             "conditioning.guidance={colour: 2.0}"]
    digits = ["log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "sample.every=-1", "train.steps=1",
              "train.ckpt_every=1"]
    return {"text": _jitter(_train(load_config(None, [*FAST, *text]), root / "text")),
            "multi": _jitter(_train(load_config(None, [*FAST, *multi]), root / "multi")),
            "class": _train(load_config(find_preset("digits-tiny"), digits), root / "class"),
            "other_bert": tiny_bert(root / "other-bert", words, 1)}


def _sample(run: Path, out: Path, *extra: str) -> str:
    rc, _, err = run_cli(["sample", "--ckpt", str(run), "--out", str(out), "--no-progress", "--threads", "1",
                          "--steps", "2", *extra])
    assert rc == 0, err
    return err


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reference(run: Path, labels, cfg, seed: int, batch: int) -> np.ndarray:
    """``generate`` called directly (2 euler steps, no map: these runs sample without bias correction)."""
    lm = load_for_sampling(run)
    with _one_thread():
        x = generate(lm.model, labels=labels, shape=lm.shape, num_classes=lm.data.num_classes, steps=2, cfg=cfg,
                     seed=seed, batch_size=batch, path=lm.objective.path)
    return to_uint8_nhwc(x)


def _encoded(run: Path, prompts: list[str]):
    conds = Conditions.from_description(load_for_sampling(run).data.conditioning)
    with _one_thread():
        return conds.encode(prompts)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_indexed_condition_gathers_the_rows_of_its_table():
    table = MultiCond({"shape": Labels(torch.tensor([3, 1, 5]), 5), "colour": Labels(torch.tensor([0, 7, 2]), 7)})
    cond = Indexed(table, torch.arange(7) % 3)
    assert batch_size(cond) == 7
    rows = select(cond, slice(2, 6))
    assert rows["shape"].ids.tolist() == [5, 3, 1, 5] and rows["colour"].ids.tolist() == [2, 0, 7, 2]
    assert select(cond, torch.tensor([6, 1]))["shape"].ids.tolist() == [3, 1]
    assert select(Indexed(torch.tensor([4, 9]), torch.tensor([1, 1, 0])), slice(None)).tolist() == [9, 9, 4]
    with pytest.raises(ValueError, match=r"rows of the table, in \[0, 3\), got 0 .. 3"):
        Indexed(table, torch.tensor([0, 3]))


# ----------------------------------------------------------------------------------------------- text


def test_prompts_give_a_captioned_grid_their_ids_and_the_samples_of_generate(runs, tmp_path):
    _sample(runs["text"], tmp_path / "s", "--prompt", A, "--prompt", B, "--num", "5", "--batch-size", "2",
            "--cfg", "1.5", "--seed", "3")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["grid.png", "sample.json", "samples.npz"]
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert sorted(z.files) == ["arr_0", "prompt_ids"]
        images, ids = z["arr_0"], z["prompt_ids"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8 and ids.tolist() == [0, 1, 0, 1, 0]
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert (meta["prompts"], meta["num"], meta["conditioning"], meta["cfg"]) == ([A, B], 5, "text", 1.5)
    labels = select(_encoded(runs["text"], [A, B]), torch.tensor(ids))  # sample i gets prompt i mod 2
    assert np.array_equal(images, _reference(runs["text"], labels, 1.5, seed=3, batch=2))
    swapped = select(_encoded(runs["text"], [B, A]), torch.tensor(ids))
    assert not np.array_equal(images, _reference(runs["text"], swapped, 1.5, seed=3, batch=2))  # prompts matter
    # the same prompts from a file (comments and blank lines skipped), --num from --per-prompt: 2 x 3
    (tmp_path / "p.txt").write_text(f"# two prompts\n\n{A}\n   \n  {B}  \n")
    _sample(runs["text"], tmp_path / "f", "--prompts", str(tmp_path / "p.txt"), "--per-prompt", "3",
            "--batch-size", "2", "--cfg", "1.5", "--seed", "3")
    with np.load(tmp_path / "f" / "samples.npz") as z:
        assert z["prompt_ids"].tolist() == [0, 1, 0, 1, 0, 1] and np.array_equal(z["arr_0"][:5], images)
    assert json.loads((tmp_path / "f" / "sample.json").read_text())["prompts"] == [A, B]
    _sample(runs["text"], tmp_path / "d", "--prompt", A, "--batch-size", "3")  # default: 4 per prompt
    with np.load(tmp_path / "d" / "samples.npz") as z:
        assert z["prompt_ids"].tolist() == [0, 0, 0, 0]


def test_clip_score_reads_the_prompts_deltafm_sample_recorded(runs, tmp_path):
    from deltafm.eval.clip_score import load_clip_scorer
    from tiny_text import tiny_clip

    _sample(runs["text"], tmp_path / "s", "--prompt", A, "--prompt", B, "--num", "4", "--batch-size", "4")
    clip = tiny_clip(tmp_path / "clip", shapes_words(), image_size=16)
    rc, out, err = run_cli(["clip-score", "--clip", str(clip), "--images", str(tmp_path / "s" / "samples.npz")])
    assert rc == 0, err
    with np.load(tmp_path / "s" / "samples.npz") as z:
        want = load_clip_scorer(clip).score(z["arr_0"], [[A, B][i] for i in z["prompt_ids"]])
    result = json.loads(out)
    assert result["n"] == 4 and result["clip_score"] == pytest.approx(float(want.mean()), abs=1e-9)
    assert sorted(result["per_prompt"]) == sorted([A, B])


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_bytes_and_other_prompts_are_refused(runs, tmp_path, monkeypatch):
    opts = ["--prompt", A, "--prompt", B, "--num", "7", "--batch-size", "2"]
    real, calls = ChunkStore.write, []

    def dying(self, start, items):
        real(self, start, items)
        calls.append(start)
        if len(calls) == 2:
            raise _Killed

    monkeypatch.setattr(ChunkStore, "write", dying)
    with pytest.raises(_Killed):
        _sample(runs["text"], tmp_path / "cut", *opts)
    monkeypatch.undo()
    before = tree_digest(tmp_path / "cut")
    assert len([n for n in before if n.startswith(f"{WORK_DIR}/chunk_")]) == 2
    rc, _, err = run_cli(["sample", "--ckpt", str(runs["text"]), "--out", str(tmp_path / "cut"), "--no-progress",
                          "--threads", "1", "--steps", "2", *opts[:2], "--prompt", "two red squares", *opts[4:]])
    assert rc == 2 and "other settings (prompts_sha256: " in err and len(err.strip().splitlines()) == 1, err
    assert tree_digest(tmp_path / "cut") == before
    assert "resuming: 4 of 7 samples" in _sample(runs["text"], tmp_path / "cut", *opts)
    _sample(runs["text"], tmp_path / "ref", *opts)
    assert _files(tmp_path / "cut") == _files(tmp_path / "ref")  # grid.png, samples.npz, sample.json


def test_two_processes_under_torchrun_write_the_files_of_one(runs, tmp_path):
    """Each rank encodes the prompts (on one thread: the same features) and samples its chunks."""
    opts = ["--prompt", A, "--prompt", B, "--num-samples", "5", "--batch-size", "2", "--steps", "2", "--cfg", "1.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get(
        "PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "deltafm", "sample", "--ckpt", str(runs["text"]), "--out", str(tmp_path / "two"),
                           "--threads", "1", "--no-progress", *opts], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    _sample(runs["text"], tmp_path / "one", *opts)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(one) == sorted(two) == ["grid.png", "sample.json", "samples.npz"]
    assert one["grid.png"] == two["grid.png"] and one["samples.npz"] == two["samples.npz"]
    meta_one, meta_two = json.loads(one["sample.json"]), json.loads(two["sample.json"])
    assert (meta_one.pop("world_size"), meta_two.pop("world_size")) == (1, 2) and meta_one == meta_two


# ----------------------------------------------------------------------------------------------- multi


def test_conditions_and_per_part_guidance_are_compositional_cfg(runs, tmp_path):
    _sample(runs["multi"], tmp_path / "g", "--condition", "shape=circle", "--guidance", "shape=3", "--num", "3",
            "--cfg", "1.5")
    with np.load(tmp_path / "g" / "samples.npz") as z:
        assert sorted(z.files) == ["arr_0", "cond.colour", "cond.shape", "condition_ids"]
        images = z["arr_0"]
        assert z["cond.shape"].tolist() == [0] * 3 and z["cond.colour"].tolist() == [7] * 3  # colour: null
    meta = json.loads((tmp_path / "g" / "sample.json").read_text())
    weights = {"shape": 3.0, "colour": 2.0}  # colour: the checkpoint's conditioning.guidance
    assert meta["conditions"] == [{"shape": "circle"}] and meta["guidance"] == weights
    conds = Conditions.from_description(load_for_sampling(runs["multi"]).data.conditioning)
    labels = conds.from_values([{"shape": "circle"}] * 3)
    lm_seed = load_for_sampling(runs["multi"]).config.sample.seed
    assert np.array_equal(images, _reference(runs["multi"], labels, weights, seed=lm_seed, batch=256))
    _sample(runs["multi"], tmp_path / "same", "--condition", "shape=circle", "--guidance", "shape=3", "--guidance",
            "colour=2", "--num", "3", "--cfg", "1.5")
    assert _files(tmp_path / "same") == _files(tmp_path / "g")
    _sample(runs["multi"], tmp_path / "off", "--condition", "shape=circle", "--guidance", "shape=1", "--guidance",
            "colour=1", "--num", "3")
    with np.load(tmp_path / "off" / "samples.npz") as z:
        assert not np.array_equal(z["arr_0"], images)
        assert np.array_equal(z["arr_0"], _reference(runs["multi"], labels, 1.0, seed=lm_seed, batch=256))


def test_a_conditions_file_cycles_its_lines(runs, tmp_path):
    (tmp_path / "c.txt").write_text("shape=circle colour=red\n# a comment\ncolour=blue\n")
    _sample(runs["multi"], tmp_path / "s", "--conditions", str(tmp_path / "c.txt"), "--num", "5", "--batch-size", "2")
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["condition_ids"].tolist() == [0, 1, 0, 1, 0]
        assert z["cond.shape"].tolist() == [0, 5, 0, 5, 0] and z["cond.colour"].tolist() == [0, 2, 0, 2, 0]
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert meta["conditions"] == [{"shape": "circle", "colour": "red"}, {"colour": "blue"}]


# ----------------------------------------------------------------------------------------------- bad input


def _file(tmp: Path, text: str) -> str:
    (tmp / "in.txt").write_text(text)
    return str(tmp / "in.txt")


BAD = [  # (id, run, options (tmp -> list), needle)
    ("prompt-to-class-model", "class", lambda t: ["--prompt", A],
     "--prompt: this model is conditioned on class ids; use --class"),
    ("prompt-to-multi-model", "multi", lambda t: ["--prompt", A], "--prompt: this model is conditioned on named"),
    ("condition-to-class-model", "class", lambda t: ["--condition", "shape=circle"], "conditioned on class ids"),
    ("condition-to-text-model", "text", lambda t: ["--condition", "shape=circle"], "--condition: this model is "
     "conditioned on text"),
    ("class-to-text-model", "text", lambda t: ["--class", "1"], "--class: this model is conditioned on text"),
    ("class-to-multi-model", "multi", lambda t: ["--class", "1"], "--class: this model is conditioned on named "
     "class-id conditions (shape, colour)"),
    ("text-without-prompts", "text", lambda t: [], "give --prompt TEXT (repeatable) or --prompts FILE"),
    ("multi-without-conditions", "multi", lambda t: [], "give --condition NAME=VALUE"),
    ("empty-prompt", "text", lambda t: ["--prompt", A, "--prompt", " "], "--prompt 2 is empty"),
    ("prompt-too-long", "text", lambda t: ["--prompt", "red " * 60], "is 62 tokens, more than max_tokens of 48"),
    ("prompt-too-long-in-file", "text", lambda t: ["--prompts", _file(t, A + "\n" + "red " * 60)],
     "line 2: the prompt ("),
    ("prompts-file-missing", "text", lambda t: ["--prompts", str(t / "nope.txt")], "nope.txt: no such file"),
    ("prompts-file-without-prompts", "text", lambda t: ["--prompts", _file(t, "# none\n\n  \n")], "has no prompts"),
    ("prompt-and-prompts", "text", lambda t: ["--prompt", A, "--prompts", _file(t, B)], "not both"),
    ("per-prompt-and-num", "text", lambda t: ["--prompt", A, "--per-prompt", "2", "--num", "4"], "give one of them"),
    ("per-prompt-0", "text", lambda t: ["--prompt", A, "--per-prompt", "0"], "--per-prompt must be >= 1"),
    ("per-prompt-for-class", "class", lambda t: ["--per-prompt", "2"], "--per-prompt: this model is conditioned on "
     "class ids"),
    ("unknown-condition", "multi", lambda t: ["--condition", "hue=red"], "unknown condition 'hue'; the model is "
     "conditioned on shape, colour"),
    ("unknown-value", "multi", lambda t: ["--condition", "shape=blob"], f"'blob' is not a value of shape ({VALUES})"),
    ("unknown-value-in-file", "multi", lambda t: ["--conditions", _file(t, "shape=circle\ncolour=navy")],
     "in.txt line 2: 'navy' is not a value of colour (red, green"),
    ("condition-not-name-value", "multi", lambda t: ["--condition", "circle"], "'circle' is not NAME=VALUE"),
    ("condition-twice", "multi", lambda t: ["--condition", "shape=circle", "--condition", "shape=cross"],
     "condition 'shape' given twice"),
    ("conditions-file-missing", "multi", lambda t: ["--conditions", str(t / "no.txt")], "no.txt: no such file"),
    ("guidance-unknown-part", "multi", lambda t: ["--condition", "shape=circle", "--guidance", "size=2"],
     "the model has no condition 'size' (it has shape, colour)"),
    ("guidance-not-a-number", "multi", lambda t: ["--condition", "shape=circle", "--guidance", "shape=x"],
     "expected NAME=W with a finite weight W >= 0"),
    ("guidance-negative", "multi", lambda t: ["--condition", "shape=circle", "--guidance", "shape=-1"], "W >= 0"),
    ("guidance-for-text", "text", lambda t: ["--prompt", A, "--guidance", "text=2"], "--guidance: this model is "
     "conditioned on text; one guidance scale: --cfg"),
    ("guidance-for-class", "class", lambda t: ["--guidance", "digit=2"], "--guidance: this model is conditioned on "
     "class ids"),
    ("text-encoder-of-other-weights", "text", None, "but the model was trained with BertModel:"),
    ("text-encoder-missing", "text", lambda t: ["--prompt", A, "--text-encoder", str(t / "none")], "--text-encoder"),
    ("text-encoder-for-multi", "multi", lambda t: ["--condition", "shape=circle", "--text-encoder", str(t)],
     "--text-encoder: this model is conditioned on named"),
]


@pytest.mark.parametrize("run,options,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_error_line_and_writes_nothing(runs, tmp_path, run, options, needle):
    args = (options(tmp_path) if options is not None else
            ["--prompt", A, "--text-encoder", str(runs["other_bert"])])
    before = tree_digest(tmp_path), tree_digest(runs[run])
    rc, out, err = run_cli(["sample", "--ckpt", str(runs[run]), "--out", str(tmp_path / "out"), "--no-progress",
                            "--threads", "1", *args])
    assert rc == 2 and out == "" and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert (tree_digest(tmp_path), tree_digest(runs[run])) == before and not (tmp_path / "out").exists()
