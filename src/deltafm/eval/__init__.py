"""Evaluation: feature extractors and sample-quality metrics (FD, IS, precision/recall, class accuracy).

Only metrics and the networks that feed them live here; the FM-vs-ΔFM study that uses them is
:mod:`deltafm.study`, pixel normalisation is :mod:`deltafm.pixels`.

* :mod:`deltafm.eval.metrics`: the metrics on arrays, and reference statistics on disk (.npz);
* :mod:`deltafm.eval.classifier`: the project's small CNN feature classifier (train, save, load);
* :mod:`deltafm.eval.inception`: Inception-v3 in the FID convention (pool3, sFID spatial features, IS
  logits), weights from a local file only;
* :mod:`deltafm.eval.adm`: reference batches in the ADM evaluation suite's format (``arr_0``, ``mu``,
  ``sigma``, ``mu_s``, ``sigma_s``), read as stored or computed from the images;
* :mod:`deltafm.eval.features`: the extractor protocol, batched extraction, ``get_extractor(spec)``,
  ``reference_statistics`` and ``evaluate_samples`` (the one scoring function);
* :mod:`deltafm.eval.along_path`: classifier accuracy of the predicted clean sample along t;
* :mod:`deltafm.eval.attributes` (+ ``attributes_train``, ``attributes_score``, ``attributes_cli``): the
  attribute reader of the coloured-shapes set and its GenEval-like prompt scores (not imported here);
* :mod:`deltafm.eval.cli`: ``deltafm eval train-classifier | ref-stats | eval | convert-inception``.

Bad input (a file, an option, labels) raises :class:`EvalInputError` (a ``ValueError`` and a
:class:`deltafm.errors.UserError`; :class:`EvalKeyError` is also a ``KeyError``).

See docs/EVAL.md.
"""

from deltafm.eval.adm import inspect_reference, load_reference
from deltafm.eval.classifier import Classifier, ClassifierConfig, load_classifier, save_classifier, train_classifier
from deltafm.eval.features import (
    FeatureExtractor,
    evaluate_samples,
    extract,
    get_extractor,
    reference_statistics,
)
from deltafm.eval.inception import FIDInceptionV3, convert_inception, load_inception
from deltafm.eval.metrics import (
    ClassAccuracy,
    EvalInputError,
    EvalKeyError,
    ReferenceStats,
    class_accuracy,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_lowrank,
    inception_score,
    load_reference_stats,
    precision_recall,
    save_reference_stats,
)

__all__ = [
    "ClassAccuracy",
    "Classifier",
    "ClassifierConfig",
    "EvalInputError",
    "EvalKeyError",
    "FIDInceptionV3",
    "FeatureExtractor",
    "ReferenceStats",
    "class_accuracy",
    "convert_inception",
    "evaluate_samples",
    "extract",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "frechet_distance_lowrank",
    "get_extractor",
    "inception_score",
    "inspect_reference",
    "load_classifier",
    "load_inception",
    "load_reference",
    "load_reference_stats",
    "precision_recall",
    "reference_statistics",
    "save_classifier",
    "save_reference_stats",
    "train_classifier",
]
