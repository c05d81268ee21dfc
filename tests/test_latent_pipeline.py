"""The latent path end to end on CPU (issue 9's acceptance): a generated image folder -> a diffusers
AutoencoderKL saved with ``save_pretrained`` -> ``deltafm prepare-latents`` under 2-process torchrun (the
same shard bytes as 1 process) -> ``deltafm train`` of a small SiT with ΔFM on the shards (z = μ + σ·ε per
step) -> a decoded PNG grid during training and ``deltafm sample``'s decoded PNG grid and ADM npz."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from cli_cases import run_cli
from test_prepare_latents import CLASSES, SIZE, make_image_tree, make_vae, shards

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_images_to_latents_to_a_trained_sit_to_decoded_samples(tmp_path):
    from PIL import Image

    make_image_tree(tmp_path / "images")
    vae = make_vae(tmp_path / "vae")
    opts = ["--input", str(tmp_path / "images"), "--vae", str(vae), "--image-size", str(SIZE), "--flip",
            "--shard-size", "5", "--batch-size", "3", "--workers", "0", "--threads", "1", "--no-progress"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "deltafm", "prepare-latents", *opts, "--out", str(tmp_path / "lat2")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    rc, _, err = run_cli(["prepare-latents", *opts, "--out", str(tmp_path / "lat1")])
    assert rc == 0, err
    one, both = shards(tmp_path / "lat1"), shards(tmp_path / "lat2")
    assert len(one) == 5 and [p.read_bytes() for p in one] == [p.read_bytes() for p in both]  # 24 items
    from deltafm.data import load_dataset

    assert load_dataset("latents", root=str(tmp_path / "lat2")).class_names == CLASSES  # from classes.json

    run = tmp_path / "run"
    rc, _, err = run_cli(["train", "--preset", "digits-tiny", "--out", str(run), "data.name=latents",
                          f"data.root={tmp_path / 'lat2'}", "model.name=SiT-N/2", "objective.lam=0.05",
                          "train.batch_size=8", "train.steps=4", "train.ckpt_every=4", "train.threads=1",
                          "sample.every=0", "sample.num=6", "sample.steps=2", "log.progress_bar=false",
                          "log.tensorboard=false"])
    assert rc == 0, err
    with Image.open(run / "samples" / "step_00000004.png") as grid:
        assert grid.mode == "RGB"
    rc, _, err = run_cli(["sample", "--ckpt", str(run), "--out", str(tmp_path / "s"), "--num", "7", "--steps", "2",
                          "--batch-size", "4", "--threads", "1", "--no-progress"])
    assert rc == 0, err
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["arr_0"].shape == (7, SIZE, SIZE, 3) and z["arr_0"].dtype == np.uint8
        assert z["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert (tmp_path / "s" / "grid.png").is_file()
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    prep = json.loads((tmp_path / "lat2" / "prepare.json").read_text())
    assert meta["vae"] == prep["vae"]
