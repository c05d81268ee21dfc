"""Data for deltafm: in-memory image datasets, the lazy latent store, a resumable batch order and the
batch loader that turns it into :class:`Batch` es (x, y, extras) (workers, prefetch, per-batch posterior
draws, REPA extras read with x).

Normalisation is defined once, in :mod:`deltafm.pixels`: uint8 pixels p -> p / 127.5 − 1 ∈ [−1, 1]
(inverse ``model_to_uint8``), latents unchanged. The one dataset builder is :func:`load_dataset`
(:mod:`deltafm.data.registry`). A dataset that cannot be loaded as asked raises :class:`DataError` (a
``ValueError`` and a :class:`deltafm.errors.UserError`) naming the file; missing files raise
``FileNotFoundError`` saying what is expected. See docs/DATA.md.

Loaders needing optional packages (PIL for folders, scikit-learn for digits) import them only when used.
"""

from deltafm.data.datasets import DataError, ImageDataset
from deltafm.data.idx import (
    FASHION_MNIST_ROOT,
    IdxFormatError,
    load_idx_dataset,
    read_idx,
    write_idx,
)
from deltafm.data.latent_store import LatentStore
from deltafm.data.latents import SD_VAE_SCALE, LatentShardWriter, load_latent_shards, write_latent_shards
from deltafm.data.loader import Batch, BatchLoader, batch_generator, batches
from deltafm.data.registry import DATASETS, load_dataset
from deltafm.data.sampler import EpochBatchSampler, epoch_seed
from deltafm.pixels import model_to_uint8, uint8_to_model

__all__ = [
    "DATASETS",
    "FASHION_MNIST_ROOT",
    "SD_VAE_SCALE",
    "Batch",
    "BatchLoader",
    "DataError",
    "EpochBatchSampler",
    "IdxFormatError",
    "ImageDataset",
    "LatentShardWriter",
    "LatentStore",
    "batch_generator",
    "batches",
    "epoch_seed",
    "load_dataset",
    "load_idx_dataset",
    "load_latent_shards",
    "model_to_uint8",
    "read_idx",
    "uint8_to_model",
    "write_idx",
    "write_latent_shards",
]
