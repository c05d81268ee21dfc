"""The ``webdataset`` training source: tar shards read item by item (never the whole set in memory), each
image ADM-cropped to ``data.image_size`` exactly as ``deltafm prepare-latents`` crops it; labels and captions
from the tars; a tiny model trains on it through the normal loop."""

from __future__ import annotations

import numpy as np
import torch

from deltafm.data import load_dataset
from deltafm.pixels import uint8_to_model
from test_prepare_latents import SIZE, _write_tars, make_image_tree, ref_crop


def test_tar_items_are_the_adm_crops_of_their_images(tmp_path):
    images = make_image_tree(tmp_path / "img")
    _write_tars(images, tmp_path / "tars")
    ds = load_dataset("webdataset", root=str(tmp_path / "tars"), image_size=SIZE, channels=3)
    assert len(ds) == len(images) and ds.kind == "images" and ds.shape == (3, SIZE, SIZE)
    assert ds.labels.tolist() == [y for _, y in images] and ds.num_classes == 3
    idx = torch.tensor([5, 0, 11, 3])
    expect = np.stack([ref_crop(images[i][0]) for i in idx.tolist()])
    assert torch.equal(ds.load_batch(idx), uint8_to_model(torch.from_numpy(expect)))
    assert ds.caption_texts([5, 6, 0]) == ["caption 0 é", None, None] and ds.captions is None  # not all have one
    sub = ds.subset(slice(0, 6))
    assert len(sub) == 6 and torch.equal(sub.load_batch(torch.tensor([5])), ds.load_batch(torch.tensor([5])))
    gray = load_dataset("webdataset", root=f"{tmp_path}/tars/part-{{0..1}}.tar", image_size=8, channels=1)
    assert gray.load_batch(torch.tensor([2])).shape == (1, 1, 8, 8)
    assert torch.equal(gray.load_batch(torch.tensor([2])),
                       uint8_to_model(torch.from_numpy(ref_crop(images[2][0], 8, "L").copy())[None]))


def test_a_model_trains_on_streamed_tars(tmp_path):
    from deltafm.train.config import find_preset, load_config
    from deltafm.train.loop import train

    images = make_image_tree(tmp_path / "img")
    _write_tars(images, tmp_path / "tars")
    cfg = load_config(find_preset("digits-tiny"), [
        "log.progress_bar=false", "log.tensorboard=false", "train.threads=1", "sample.every=-1",
        "data.name=webdataset", f"data.root={tmp_path / 'tars'}", "data.image_size=8", "data.channels=3",
        "model.name=SiT-N/4", "train.batch_size=4", "train.steps=2", "train.ckpt_every=2"])
    with torch.random.fork_rng(devices=[]):
        result = train(cfg, tmp_path / "run")
    assert result.status == "done" and result.images_seen == 8
