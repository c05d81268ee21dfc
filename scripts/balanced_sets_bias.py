"""How much lower FD and KID read on class-balanced sets than on i.i.d. ones (docs/EVAL.md).

Real Fashion-MNIST training images against the test split, in the features of the study classifier: for each
n, 20 draws of n images at random and 20 class-balanced draws of n/10 images per class
(``deltafm.study.checks.balanced_order``, as the checks' floor); mean ± standard error of FD and KID.

    .venv/bin/python scripts/balanced_sets_bias.py [--classifier weights/fmnist-classifier.safetensors]

Takes about 5 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from deltafm.data.idx import FASHION_MNIST_ROOT, load_idx_dataset
from deltafm.eval.classifier import load_classifier
from deltafm.eval.features import extract
from deltafm.eval.frechet import frechet_distance_from_features
from deltafm.eval.kid import kid
from deltafm.study.checks import balanced_order


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classifier", default="weights/fmnist-classifier.safetensors")
    p.add_argument("--draws", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    clf = load_classifier(args.classifier).eval()
    train = load_idx_dataset(FASHION_MNIST_ROOT, "train")
    test = load_idx_dataset(FASHION_MNIST_ROOT, "test")
    idx = np.random.default_rng(0).choice(len(train.images), 12000, replace=False)
    with torch.no_grad():
        pool = extract(clf, train.images[idx], progress=False).features
        ref = extract(clf, test.images, progress=False).features
    labels = np.asarray(train.labels)[idx]

    def se(x: list[float]) -> str:
        a = np.asarray(x)
        return f"{a.mean():.4g} ± {a.std(ddof=1) / np.sqrt(len(a)):.2g}"

    print("| n | FD i.i.d. | FD balanced | KID×10³ i.i.d. | KID×10³ balanced |\n|---|---|---|---|---|")
    for n in (250, 500, 1000, 2000):
        fd = {"iid": [], "bal": []}
        kd = {"iid": [], "bal": []}
        for r in range(args.draws):
            rng = np.random.default_rng(100 + r)
            draws = (("iid", rng.choice(len(pool), n, replace=False)), ("bal", balanced_order(labels, n, 10, rng)))
            for key, rows in draws:
                fd[key].append(frechet_distance_from_features(pool[rows], ref))
                kd[key].append(1e3 * kid(pool[rows], ref, 50, min(n, 1000), seed=r)[0])
        print(f"| {n} | {se(fd['iid'])} | {se(fd['bal'])} | {se(kd['iid'])} | {se(kd['bal'])} |")


if __name__ == "__main__":
    main()
