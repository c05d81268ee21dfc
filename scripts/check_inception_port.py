#!/usr/bin/env python
"""Compare deltafm's FID Inception-v3 port with pytorch-fid's, on the same random weights and images.

No real Inception weights can be downloaded here, so both networks get the SAME randomly initialised
weights: the reference side builds pytorch-fid's FID Inception (torchvision's ``Inception3`` with
pytorch-fid's patched blocks, 1008 classes, no auxiliary head), randomises every parameter and BatchNorm
statistic, saves the state dict as safetensors and runs its own forward pass (pytorch-fid's resize to
299 and scaling to [-1, 1]); this side loads that file with ``deltafm.eval.inception.load_inception``
(no key mapping is needed: the port uses torchvision's parameter names) and runs the port on the same
uint8 images. Compared: pool3 features (FID), logits with and without the fc bias (Inception Score), and
the sFID spatial features (pytorch-fid side: a forward hook on ``Mixed_6d.branch1x1``, channels 0..6,
flattened in (H, W, C) order).

The two sides run in different Python environments (pytorch-fid needs torchvision, which the project
does not install), so this script calls itself with ``--reference-python``:

    python3 -m venv /tmp/venv-fid
    /tmp/venv-fid/bin/pip install torch==2.14.1 torchvision==0.29.1 safetensors numpy scipy pillow
    /tmp/venv-fid/bin/pip install --no-deps pytorch-fid==0.3.0
    .venv/bin/python scripts/check_inception_port.py --reference-python /tmp/venv-fid/bin/python

It prints the max abs and max relative differences per output, in float32 and float64, and exits 1
when a float64 difference exceeds ``--tol`` (relative to the output's scale). Not a default test: it
needs the second environment (5.6 GB on x86_64).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _randomise(model, seed: int) -> None:
    """Random weights that keep activations O(1) through the ~95 layers: He-normal convolutions, random
    BatchNorm affine parameters and running statistics, a random fc. Every parameter matters."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if t.ndim == 4:  # conv weight
                fan_in = t.shape[1] * t.shape[2] * t.shape[3]
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean") or name.endswith(".bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("bn.weight"):
                t.copy_(0.75 + 0.5 * torch.rand(t.shape, generator=g))
            elif name == "fc.weight":
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5)
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(t.shape)}")


def _images(n: int, size: int, seed: int):
    """uint8 (N, H, W, 3): smooth random colour fields plus noise (not just white noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), dtype=np.float64)
    for i in range(n):
        for c in range(3):
            a, b, ph = rng.uniform(1, 6, size=2).tolist() + [rng.uniform(0, 6.3)]
            out[i, :, :, c] = 0.5 + 0.4 * np.sin(a * xx * 3.1 + b * yy * 2.3 + ph)
    out += 0.08 * rng.standard_normal(out.shape)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def reference_side(workdir: Path, n: int, size: int, seed: int) -> None:
    """Runs in the pytorch-fid environment: random weights → safetensors, reference outputs → npz."""
    import numpy as np
    import pytorch_fid
    import pytorch_fid.inception as pfi
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    built = {}

    def build_random_fid_inception():
        # pytorch-fid's fid_inception_v3() without its download: same torchvision model, same patched blocks
        net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pfi.FIDInceptionE_1(1280)
        net.Mixed_7c = pfi.FIDInceptionE_2(2048)
        _randomise(net, seed)
        built["net"] = net
        return net

    pfi.fid_inception_v3 = build_random_fid_inception  # InceptionV3(use_fid_inception=True) calls it
    model = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    net = built["net"].eval()
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(workdir / "random-fid-inception.safetensors"))

    images = _images(n, size, seed)
    np.save(workdir / "images.npy", images)
    out = {}
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        net.to(dtype)  # the wrapper holds the blocks only, not fc
        spatial: dict = {}
        hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o, store=spatial: store.setdefault("x", o))
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255.0  # pytorch-fid takes [0, 1]
        with torch.no_grad():
            pool3 = model(x)[0].flatten(1)
            logits = net.fc(pool3)
            full = net(2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                                            align_corners=False) - 1)  # torchvision's forward
            unbiased = pool3 @ net.fc.weight.T
        hook.remove()
        tag = "f32" if dtype == torch.float32 else "f64"
        out[f"pool3_{tag}"] = pool3.double().numpy()
        out[f"logits_{tag}"] = logits.double().numpy()
        out[f"logits_unbiased_{tag}"] = unbiased.double().numpy()
        out[f"logits_tv_{tag}"] = full.double().numpy()
        out[f"spatial_{tag}"] = spatial["x"][:, :7].permute(0, 2, 3, 1).flatten(1).double().numpy()
    np.savez(workdir / "reference.npz", **out)
    (workdir / "versions.json").write_text(json.dumps({
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "pytorch_fid": getattr(pytorch_fid, "__version__", "?"), "python": sys.version.split()[0]}))


def compare_side(workdir: Path) -> dict:
    """Runs in the project environment: the port on the same weights and images."""
    import numpy as np
    import torch

    from deltafm.eval.inception import load_inception
    from deltafm.pixels import images_to_model

    torch.set_num_threads(1)
    ref = np.load(workdir / "reference.npz")
    images = np.load(workdir / "images.npy")
    model = load_inception(workdir / "random-fid-inception.safetensors")
    report = {"versions": json.loads((workdir / "versions.json").read_text()), "images": list(images.shape)}
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        model.to(dtype)
        # float64: map the pixels in float64 (images_to_model works in float32, whose rounding, ~1e-7, would
        # hide the comparison); x / 127.5 - 1 is the map of deltafm.pixels.uint8_to_model
        x = images_to_model(images, "NHWC") if dtype == torch.float32 else \
            torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1
        with torch.no_grad():
            outs = model.outputs(x)
            logits = model.logits(x)
        ours = {"pool3": outs["features"], "spatial": outs["spatial"], "logits_unbiased": outs["logits"],
                "logits": logits, "logits_tv": logits}
        for key, value in ours.items():
            theirs = ref[f"{key}_{tag}"]
            mine = value.double().numpy()
            diff = float(np.abs(mine - theirs).max())
            scale = float(np.abs(theirs).max())
            report[f"{key}_{tag}"] = {"max_abs_diff": diff, "max_abs_value": scale, "rel": diff / scale,
                                      "shape": list(theirs.shape)}
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference-python", help="python of the environment with pytorch-fid")
    p.add_argument("--reference-side", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("-n", type=int, default=8, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image size before the resize to 299")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-9, help="largest accepted float64 relative difference")
    args = p.parse_args()
    if args.reference_side:
        reference_side(Path(args.reference_side), args.n, args.size, args.seed)
        return 0
    if not args.reference_python:
        p.error("--reference-python is required")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([args.reference_python, __file__, "--reference-side", tmp, "-n", str(args.n), "--size",
                        str(args.size), "--seed", str(args.seed)], check=True)
        report = compare_side(Path(tmp))
    print(json.dumps(report, indent=2))
    worst = max(v["rel"] for k, v in report.items() if k.endswith("_f64"))
    print(f"worst float64 relative difference: {worst:.3g} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
