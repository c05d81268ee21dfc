"""``deltafm prepare-latents`` under torchrun: 2 gloo processes write the shards 1 process writes (byte for
byte: shard headers are written canonically, see ``latent_format.canonical_safetensors``), and bad input
met by one rank ends the job with one ``error:`` line after the other rank's shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_prepare_latents import SIZE, make_image_tree, make_vae, prepare, shard_content, shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("dprep")
    make_image_tree(base / "images")
    return make_vae(base / "vae"), base / "images"


def _torchrun(vae: Path, images: Path, out: Path, opts: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "deltafm",
           "prepare-latents", "--input", str(images), "--out", str(out), "--vae", str(vae), "--image-size", str(SIZE),
           "--workers", "0", "--threads", "1", "--no-progress", *opts]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_write_the_shards_of_one_process(inputs, tmp_path):
    vae, images = inputs
    opts = ["--flip", "--shard-size", "3", "--batch-size", "2"]  # 24 items: 8 shards, 4 per rank
    done = _torchrun(vae, images, tmp_path / "two", opts)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 24 latents") == 1  # rank 0 reports
    rc, _, err = prepare(str(images), tmp_path / "one", vae, *opts, "--threads", "1")  # as each rank: 1 thread
    assert rc == 0, err
    one, two = shards(tmp_path / "one"), shards(tmp_path / "two")
    assert [p.name for p in one] == [p.name for p in two] == [f"shard-{k:05d}.safetensors" for k in range(8)]
    assert [shard_content(p) for p in one] == [shard_content(p) for p in two]
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]
    for name in ("prepare.json", "classes.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.slow  # about 15 s on 2 cores
def test_bad_input_on_one_rank_ends_the_job_with_one_error_line(inputs, tmp_path):
    vae, images = inputs
    bad = images / "train" / "n01484850" / "img_2.png"  # the 11th image: item 10, shard 5, rank 1
    saved = bad.read_bytes()
    bad.write_bytes(b"not an image")
    try:
        done = _torchrun(vae, images, tmp_path / "out", ["--shard-size", "2", "--batch-size", "2"])
    finally:
        bad.write_bytes(saved)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: rank 1: cannot read image {bad.resolve()}"), \
        done.stderr[-3000:]
    assert [p.name for p in shards(tmp_path / "out")] == [f"shard-{k:05d}.safetensors" for k in (0, 1, 2, 3, 4)]
