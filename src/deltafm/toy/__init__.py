"""Toy 2-D study of ΔFM: class-conditional datasets with exact densities, metrics, and the
``deltafm toy`` runner that trains FM and ΔFM side by side and measures how the class flows separate.

Submodules: :mod:`~deltafm.toy.datasets`, :mod:`~deltafm.toy.metrics`, :mod:`~deltafm.toy.study`,
:mod:`~deltafm.toy.plots`, :mod:`~deltafm.toy.cli`.
"""

from deltafm.toy.datasets import DATASETS, ToyDataset, get_dataset

__all__ = ["DATASETS", "ToyDataset", "get_dataset"]
