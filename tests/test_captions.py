"""Captions beside images, at every layout the data layer reads: webdataset tars as img2dataset writes CC3M
(``KEY.txt``, else the ``caption`` of ``KEY.json``), image folders with ``img.txt`` beside ``img.png`` (flat or
class subfolders), and latent shards with the ``captions-XXXXX.json`` files prepare-latents writes. Each gives
the distinct captions and each item's id, read per batch as the ``caption`` extra; an item without a caption
is a DataError naming it, raised only when captions are asked for."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deltafm.data import DataError, EpochBatchSampler, LatentStore, batches, load_dataset, write_latent_shards
from deltafm.data.captions import CaptionList
from deltafm.data.image_sources import open_source


def _png(rgb: tuple[int, int, int], size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A plain tar of webdataset samples: (key, {extension: bytes})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _meta(key: str, **fields: object) -> bytes:
    """img2dataset's per-sample json (no label)."""
    return json.dumps({"key": key, "status": "success", "width": 6, "height": 6, **fields}).encode()


def cc3m_tars(folder: Path) -> list[Path]:
    """Two shards in img2dataset's layout: captions from .txt (whitespace around them), from .json only, a
    repeated caption, a .jpg member (PNG bytes: Pillow reads by content)."""
    return [
        _tar(folder / "00000.tar", [
            ("000000000", {"jpg": _png((255, 0, 0)), "txt": b"a red square\n",
                           "json": _meta("000000000", caption="the .txt wins")}),
            ("000000001", {"png": _png((0, 0, 255)), "json": _meta("000000001", caption="  a blue circle ")}),
            ("000000002", {"png": _png((250, 0, 0)), "txt": b"a red square"}),
        ]),
        _tar(folder / "00001.tar", [("000010000", {"webp": _png((0, 200, 0)), "txt": "deux points verts é".encode(),
                                                   "json": _meta("000010000")})]),
    ]


def test_webdataset_captions_as_img2dataset_writes_them(tmp_path):
    cc3m_tars(tmp_path / "cc3m")
    ds = load_dataset("webdataset", root=str(tmp_path / "cc3m"), image_size=4)
    assert isinstance(ds.captions, CaptionList)
    assert list(ds.captions) == ["a red square", "a blue circle", "deux points verts é"]
    assert ds.caption_ids.tolist() == [0, 1, 0, 2]
    assert ds.labels.tolist() == [0, 0, 0, 0] and ds.num_classes == 1  # img2dataset's json has no label
    assert ds.caption_texts([3, 1]) == ["deux points verts é", "a blue circle"]
    assert ds.load_extras(torch.tensor([3, 0, 1]), ["caption"])["caption"].tolist() == [2, 0, 1]
    assert ds.load_batch(torch.tensor([0, 3])).shape == (2, 3, 4, 4)
    sub = ds.subset([2, 1])
    assert sub.caption_ids.tolist() == [0, 1] and sub.captions is ds.captions
    sampler = EpochBatchSampler(len(ds), batch_size=2, seed=0)
    x, y, extras = next(batches(ds, sampler, extras=("caption",)))
    index = sampler.local_batch(0, 0)
    assert torch.equal(extras["caption"], ds.caption_ids[index]) and x.shape == (2, 3, 4, 4)
    with pytest.raises(DataError, match="has no extras 'images'; pixel data carries no extras"):
        ds.load_extras(torch.tensor([0]), ["images"])


def test_a_captioned_dataset_by_name_gives_its_captions_to_prepare_latents():
    from deltafm.data.image_sources import DatasetSource

    scenes = load_dataset("shapes-scenes", max_items=6, image_size=16)
    src = DatasetSource(scenes, "shapes-scenes")
    src.limit(4)
    assert [src.caption(i) for i in range(4)] == [scenes.captions[int(c)] for c in scenes.caption_ids[:4]]
    assert src.caption_codes.shape == (4,)


def test_a_json_label_and_caption_go_together(tmp_path):
    labelled = json.dumps({"label": 2, "caption": "c"}).encode()
    _tar(tmp_path / "l.tar", [("a", {"png": _png((1, 2, 3)), "json": labelled}),
                              ("b", {"png": _png((1, 2, 3)), "cls": b"0", "txt": b"d"})])
    src = open_source([str(tmp_path / "l.tar")])
    assert src.labels.tolist() == [2, 0] and [src.caption(i) for i in range(2)] == ["c", "d"] and src.has_captions


def test_tar_samples_without_a_caption_are_named_when_captions_are_asked(tmp_path):
    _tar(tmp_path / "bad.tar", [("a", {"png": _png((1, 1, 1)), "txt": b"x"}),
                                ("b", {"png": _png((2, 2, 2)), "json": _meta("b")}),
                                ("c", {"png": _png((3, 3, 3)), "txt": b"  \n"})])
    ds = load_dataset("webdataset", root=str(tmp_path / "bad.tar"), image_size=4)
    assert ds.captions is None and ds.caption_ids is None and len(ds) == 3  # class conditioning is unaffected
    assert ds.caption_texts([0, 1, 2]) == ["x", None, None]
    no_caption = r"bad.tar:b has no caption \(no .txt member, and no 'caption' field in a .json member\) \(2 of 3"
    with pytest.raises(DataError, match=no_caption):
        ds.require_captions()
    with pytest.raises(DataError, match=no_caption):
        ds.load_extras(torch.tensor([0]), ["caption"])
    with pytest.raises(DataError, match=r"bad.tar:c: its caption \(.txt, or 'caption' in .json\) is empty \(1 of 1"):
        ds.subset([2]).require_captions()
    first = ds.subset(slice(0, 1))
    first.require_captions()
    assert list(first.captions) == ["x"] and first.caption_ids.tolist() == [0]


def _image(path: Path, rgb: tuple[int, int, int], caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((5, 5, 3), rgb, np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


def test_folder_captions_flat_and_with_class_subfolders(tmp_path):
    flat = tmp_path / "flat"
    _image(flat / "img_001.png", (10, 0, 0), "a cat\n")
    _image(flat / "img_002.jpg", (0, 10, 0), " a dog ")
    _image(flat / "img_003.png", (0, 0, 10), "a cat")
    (flat / "notes.txt").write_text("matches no image")
    ds = load_dataset("folder", root=str(flat))
    assert ds.class_names is None and ds.num_classes == 1 and ds.labels.tolist() == [0, 0, 0]
    assert ds.captions == ("a cat", "a dog") and ds.caption_ids.tolist() == [0, 1, 0]
    assert ds.images[2, :, 0, 0].tolist() == [0, 0, 10]  # (img_002 is a lossy JPEG)
    assert ds.load_extras(torch.tensor([1, 2]), ["caption"])["caption"].tolist() == [1, 0]
    ds.require_captions()
    assert ds.subset(torch.tensor([2, 1])).caption_ids.tolist() == [0, 1]
    src = open_source([str(flat)])  # prepare-latents' reader of the same folder
    assert [src.caption(i) for i in range(3)] == ["a cat", "a dog", "a cat"] and src.has_captions

    classes = tmp_path / "classes"
    _image(classes / "dog" / "b.png", (1, 1, 1), "a dog")
    _image(classes / "cat" / "sub" / "a.png", (2, 2, 2), "a cat")
    ds = load_dataset("folder", root=str(classes))
    assert ds.class_names == ("cat", "dog") and ds.labels.tolist() == [0, 1]
    assert ds.captions == ("a cat", "a dog") and ds.caption_ids.tolist() == [0, 1]
    src = open_source([str(classes)])
    assert src.labels.tolist() == [0, 1] and [src.caption(i) for i in range(2)] == ["a cat", "a dog"]


def test_folder_images_without_a_caption_are_named(tmp_path):
    flat = tmp_path / "flat"
    _image(flat / "img_001.png", (10, 0, 0), "a cat")
    _image(flat / "img_002.png", (0, 10, 0))
    _image(flat / "img_003.png", (0, 0, 10), "a cat")
    ds = load_dataset("folder", root=str(flat))
    assert ds.captions is None and ds.caption_ids is None and ds.labels.tolist() == [0, 0, 0]
    with pytest.raises(DataError, match=r"image .*img_002.png has no caption file img_002.txt beside it \(1 of 3"):
        ds.require_captions()
    kept = ds.subset([0, 2])
    assert kept.captions == ("a cat",) and kept.caption_ids.tolist() == [0, 0]
    (flat / "img_002.txt").write_text(" \n")
    with pytest.raises(DataError, match=r"caption file .*img_002.txt is empty"):
        load_dataset("folder", root=str(flat)).require_captions()
    src = open_source([str(flat)])
    assert src.caption(1) is None and src.caption_problem(1) == f"caption file {flat.resolve()}/img_002.txt is empty"
    _image(tmp_path / "mixed" / "cls" / "a.png", (1, 1, 1))
    _image(tmp_path / "mixed" / "b.png", (1, 1, 1))
    with pytest.raises(DataError, match="holds both class subfolders \\(cls\\) and 1 image"):
        load_dataset("folder", root=str(tmp_path / "mixed"))


def _side(folder: Path, k: int, captions: list[str | None]) -> None:
    side = {"shard": f"shard-{k:05d}.safetensors", "names": [f"n{k}{j}" for j in range(len(captions))],
            "flipped": [False] * len(captions), "captions": captions}
    (folder / f"captions-{k:05d}.json").write_text(json.dumps(side))


def test_latent_shards_carry_the_captions_files_beside_them(tmp_path):
    lat = tmp_path / "lat"
    write_latent_shards(lat, torch.zeros(5, 4, 2, 2), torch.zeros(5, dtype=torch.long), shard_size=3)
    assert LatentStore(lat).captions is None  # no captions files: class-labelled latents, as always
    _side(lat, 0, ["a", " b", "a"])
    _side(lat, 1, ["c", None])
    store = LatentStore(lat)
    assert store.captions is None
    with pytest.raises(DataError, match=r"captions-00001.json: item 1 \(n11\) has no caption \(1 of 5"):
        store.require_captions()
    head = store.subset(slice(0, 4))
    assert list(head.captions) == ["a", "b", "c"] and head.caption_ids.tolist() == [0, 1, 0, 2]
    got = head.load_extras(torch.tensor([3, 1]), ["caption"])
    assert list(got) == ["caption"] and got["caption"].tolist() == [2, 1]
    assert store.subset([4, 0]).caption_ids is None and store.subset([3, 0]).caption_ids.tolist() == [2, 0]
    (lat / "captions-00001.json").unlink()
    with pytest.raises(DataError, match=r"latent shard .*shard-00001.safetensors has no captions file "
                                        r"captions-00001.json beside it .*\(2 of 5"):
        LatentStore(lat).load_extras(torch.tensor([0]), ["caption"])
    _side(lat, 1, ["c", "d", "e"])
    with pytest.raises(DataError, match=r"captions-00001.json: holds 3 captions of 'shard-00001.safetensors', but "
                                        r"shard-00001.safetensors has 2 items"):
        _ = LatentStore(lat).captions


def test_prepare_latents_carries_tar_captions_into_the_latents(tmp_path):
    pytest.importorskip("diffusers")
    from test_prepare_latents import SIZE, make_vae, prepare

    cc3m_tars(tmp_path / "cc3m")
    rc, _, err = prepare(str(tmp_path / "cc3m"), tmp_path / "lat", make_vae(tmp_path / "vae"), "--flip",
                         "--shard-size", "3", "--storage-dtype", "float32")
    assert rc == 0, err
    store = load_dataset("latents", root=str(tmp_path / "lat"))
    assert len(store) == 8 and store.image_size == SIZE // 2
    texts = [store.captions[int(i)] for i in store.caption_ids]
    want = ["a red square", "a blue circle", "a red square", "deux points verts é"]
    assert texts == [t for t in want for _ in "ab"]  # each image and its mirror
    assert torch.equal(store.load_extras(torch.arange(8), ["caption"])["caption"], store.caption_ids)
