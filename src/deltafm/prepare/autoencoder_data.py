"""The images ``deltafm train-autoencoder`` trains and evaluates on: loaded, fitted to the model's size.

Any image dataset of :func:`deltafm.data.load_dataset` (uint8 pixels; model space x = p/127.5 − 1 via
:mod:`deltafm.pixels`). Its H × W images are brought to S × S, S a multiple of the downsampling factor:

* ``pad`` (default): centred padding by **edge replication** (``F.pad(mode="replicate")``),
  top = ⌊(S − H)/2⌋, bottom = S − H − top (same for the width). Pixels are kept exactly, so the original
  image is the crop ``[top : S − bottom, left : S − right]`` (:meth:`Fitted.native`). On Fashion-MNIST
  (28 → 32: 2 px each side) the border pixels are background (0), so this equals zero padding there;
  unlike reflection it never mirrors a garment that touches the border into the padding.
* ``resize``: bilinear, antialiased (``F.interpolate(antialias=True)``), rounded back to uint8.
* ``adm``: the ADM centre crop of ``deltafm prepare-latents`` (:func:`deltafm.data.crop.crop_to_array`:
  BICUBIC to the shorter side, centred square), so that the autoencoder sees exactly the pixels that
  ``prepare-latents --image-size S`` makes from the same images saved losslessly in a folder.

With ``resize`` and ``adm`` there is no exact way back: PSNR and rFD are measured at S × S.

``channels 3`` on a gray dataset replicates the gray channel (the 3-channel shape of SD-VAE); the native
view averages the channels back. Held-out images come from the dataset's ``test`` split, or, for a folder
without one, are carved off the training images by a seeded permutation (and never trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deltafm.seeding import derive_seed

from .autoencoder_config import AutoencoderSettings, TrainAutoencoderError
from .splits import train_heldout_splits

__all__ = ["Fitted", "fit_images", "load_autoencoder_data", "target_size"]


@dataclass
class Fitted:
    """Training and held-out images (uint8 (N, C, S, S)) and how they were made from the dataset's."""

    train: torch.Tensor
    heldout: torch.Tensor
    name: str
    native_shape: tuple[int, int, int]
    image_size: int
    fit: str
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    replicated: bool = False
    heldout_source: str = "test split"

    @property
    def channels(self) -> int:
        return int(self.train.shape[1])

    def native(self, x: torch.Tensor, reduce_channels: bool = False) -> torch.Tensor:
        """Model-size images (…, C, S, S) → the dataset's own pixels: the padding cropped off; with
        ``reduce_channels`` a replicated gray channel is averaged back to one (rounded for uint8 input)."""
        top, bottom, left, right = self.pad
        s = x.shape[-1]
        x = x[..., top:s - bottom, left:s - right]
        if reduce_channels and self.replicated:
            mean = x.float().mean(dim=-3, keepdim=True)
            x = mean.round().to(torch.uint8) if x.dtype == torch.uint8 else mean
        return x

    def record(self) -> dict[str, Any]:
        """What autoencoder.json says about the data (enough to prepare the same inputs again)."""
        return dict(dataset=self.name, native_shape=list(self.native_shape), image_size=self.image_size,
                    channels=self.channels, fit=self.fit, pad_top_bottom_left_right=list(self.pad),
                    pad_mode="replicate" if self.fit == "pad" else None, replicated_gray=self.replicated,
                    train_items=int(self.train.shape[0]), heldout_items=int(self.heldout.shape[0]),
                    heldout_source=self.heldout_source)


def target_size(native: int, given: int | None, downsample: int) -> int:
    """S: the given size, or the smallest multiple of 2·``downsample`` that is ≥ the native side, so that
    the latent side S / downsample is even (patch size 2 of the SiT-*/2 models): Fashion-MNIST 28 → 32."""
    if given is not None:
        return given
    step = 2 * downsample
    return -(-native // step) * step


def fit_images(images: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """uint8 (N, C, H, W) → uint8 (N, C, size, size) and the padding (top, bottom, left, right) added.

    ``pad``: centred edge-replicate padding (size ≥ H, W); ``resize``: bilinear antialiased resize;
    ``adm``: the ADM centre crop of ``deltafm prepare-latents``."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images, (0, 0, 0, 0)
    if mode == "adm":
        return _adm(images, size), (0, 0, 0, 0)
    if mode == "pad":
        if size < h or size < w:
            raise TrainAutoencoderError(f"--image-size {size} is smaller than the images ({h}x{w}); padding "
                                        "cannot shrink them: pass --fit resize or a larger --image-size")
        top, left = (size - h) // 2, (size - w) // 2
        pad = (top, size - h - top, left, size - w - left)
        out = F.pad(images.float(), (pad[2], pad[3], pad[0], pad[1]), mode="replicate")
        return out.to(torch.uint8), pad
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, 4096):  # bounded memory for large sets
        chunk = images[start:start + 4096].float()
        y = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + 4096] = y.round().clamp(0, 255).to(torch.uint8)
    return out, (0, 0, 0, 0)


def _adm(images: torch.Tensor, size: int) -> torch.Tensor:
    """The ADM crop of every image (PIL, one image at a time)."""
    from PIL import Image

    from deltafm.data.crop import crop_to_array

    c = int(images.shape[1])
    arrays = images.permute(0, 2, 3, 1).numpy()
    out = [crop_to_array(Image.fromarray(a[:, :, 0] if c == 1 else a), size, c) for a in arrays]
    return torch.from_numpy(np.stack(out)) if out else images.new_zeros((0, c, size, size))


def _load_splits(s: AutoencoderSettings) -> tuple[Any, Any, str]:
    """(train, held-out) ImageDatasets and where the held-out items came from."""
    key = s.dataset.lower().replace("_", "-")
    opts: dict[str, Any] = {}
    if key == "folder":
        opts = dict(image_size=s.image_size, channels=s.channels if s.channels is not None else 3)
    if key == "latents":
        raise TrainAutoencoderError("dataset 'latents' holds latents, not images: train the autoencoder on the "
                                    "images (fashion-mnist, mnist, digits or folder)")

    def held_count(n: int) -> int:
        if n <= s.heldout:
            raise TrainAutoencoderError(f"{s.root} has {n} images and no test/ subfolder: cannot hold out "
                                        f"--heldout {s.heldout} of them and still train; lower --heldout")
        return s.heldout

    g = torch.Generator().manual_seed(derive_seed(s.seed, 0, "autoencoder-heldout"))
    return train_heldout_splits(s.dataset, s.root, opts, s.max_items, s.heldout, g, held_count)


def load_autoencoder_data(s: AutoencoderSettings) -> Fitted:
    """Load, fit and check the images of a run (errors name the option to change)."""
    train, held, source = _load_splits(s)
    if train.kind != "images":
        raise TrainAutoencoderError(f"dataset {train.name!r} does not hold images")
    c0, h, w = train.shape
    if c0 == 3 and s.channels == 1:
        raise TrainAutoencoderError(f"{train.name} has RGB images; --channels 1 is taken only by gray datasets "
                                    "(for a folder it converts to gray when loading)")
    size = target_size(max(h, w), s.image_size, s.downsample)
    if size % s.downsample:
        raise TrainAutoencoderError(f"image size {size} is not a multiple of the downsampling factor "
                                    f"{s.downsample}")
    if s.batch_size > len(train):
        raise TrainAutoencoderError(f"--batch-size {s.batch_size} is larger than the {len(train)} training images")
    if len(held) < 2:
        raise TrainAutoencoderError(f"only {len(held)} held-out image(s); need at least 2")
    x_train, pad = fit_images(train.images, size, s.fit)
    x_held, _ = fit_images(held.images, size, s.fit)
    replicated = c0 == 1 and s.channels == 3
    if replicated:
        x_train, x_held = (x.expand(-1, 3, -1, -1).contiguous() for x in (x_train, x_held))
    return Fitted(train=x_train, heldout=x_held, name=train.name, native_shape=(c0, h, w), image_size=size,
                  fit=s.fit if (h, w) != (size, size) else "none", pad=pad, replicated=replicated,
                  heldout_source=source)
