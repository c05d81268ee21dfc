"""Toy 2-D study of ΔFM: class-conditional datasets with exact densities, metrics, and the
``deltafm toy`` runner that trains FM and ΔFM side by side and measures how the class flows separate.

Submodules: :mod:`~deltafm.toy.datasets`, :mod:`~deltafm.toy.metrics`, :mod:`~deltafm.toy.oracle`,
:mod:`~deltafm.toy.config`, :mod:`~deltafm.toy.train`, :mod:`~deltafm.toy.velocity`,
:mod:`~deltafm.toy.evaluate`, :mod:`~deltafm.toy.tables`, :mod:`~deltafm.toy.plots`,
:mod:`~deltafm.toy.study` (:func:`run_study`, the whole study) and :mod:`~deltafm.toy.cli`.  Quick use::

    from deltafm.toy import preset_config, run_study
    metrics = run_study(preset_config("paper-fig3", seed=0), out_dir="runs/toy")
"""

from deltafm.toy.config import PRESETS, ToyConfig, preset_config
from deltafm.toy.datasets import DATASETS, ToyDataset, get_dataset
from deltafm.toy.study import run_study

__all__ = ["DATASETS", "PRESETS", "ToyConfig", "ToyDataset", "get_dataset", "preset_config", "run_study"]
