"""KID (deltafm.eval.kid) against closed forms and a loop over pairs; KID inside evaluate_samples; the TOST
equivalence verdict of study.paired; the per-seed combination of study units; the provenance record."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deltafm.eval.kid import kid, polynomial_mmd2_unbiased


def _loop_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """MMD²_u written pair by pair from its definition."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_mmd2_equals_the_pairwise_definition_and_a_closed_form():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(7, 3))
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(_loop_mmd2(x, y), rel=1e-12)
    # constant sets a and b in 1-d: k = (ab + 1)^3, so MMD² = (a²+1)³ + (b²+1)³ − 2(ab+1)³ exactly
    a, b = 0.7, -1.3
    want = (a * a + 1) ** 3 + (b * b + 1) ** 3 - 2 * (a * b + 1) ** 3
    assert polynomial_mmd2_unbiased(np.full((5, 1), a), np.full((5, 1), b)) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="same size"):
        polynomial_mmd2_unbiased(x, y[:5])


def test_kid_is_unbiased_seeded_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    # equal distributions: the mean over many independent estimates is 0 within its standard error
    vals = [polynomial_mmd2_unbiased(rng.normal(size=(20, 4)), rng.normal(size=(20, 4))) for _ in range(400)]
    assert abs(np.mean(vals)) < 3 * np.std(vals) / np.sqrt(len(vals))
    real = rng.normal(size=(300, 4))
    near, far = rng.normal(0.2, 1, size=(200, 4)), rng.normal(1.0, 1, size=(200, 4))
    k_near, sd, m = kid(near, real, subsets=20, subset_size=100, seed=3)
    assert m == 100 and sd > 0 and kid(near, real, subsets=20, subset_size=100, seed=3)[0] == k_near
    assert kid(far, real, subsets=20, subset_size=100)[0] > k_near > 0
    # one subset of every row is the plain estimator on all rows (in the drawn order, which it does not depend on)
    assert kid(near[:50], real[:50], subsets=1, subset_size=50)[0] == pytest.approx(
        polynomial_mmd2_unbiased(near[:50], real[:50]), rel=1e-12)
    with pytest.raises(ValueError, match="one width"):
        kid(near, real[:, :3])


def test_evaluate_samples_reports_kid_of_the_classifier_features():
    import torch

    from deltafm.eval.features import evaluate_samples, extract, reference_statistics

    class Feat(torch.nn.Module):
        extractor_id = "test:feat"

        def features(self, x):
            return x.flatten(1)[:, :6].float()

        def logits(self, x):
            return None

    rng = np.random.default_rng(2)
    real = rng.integers(0, 256, size=(60, 1, 4, 4), dtype=np.uint8)
    fake = rng.integers(0, 200, size=(40, 1, 4, 4), dtype=np.uint8)
    ext = Feat()
    ref = reference_statistics(ext, torch.from_numpy(real), progress=False)
    res = evaluate_samples(ext, torch.from_numpy(fake), ref, fd_method="eigh", progress=False, kid_subsets=7,
                           kid_subset_size=30, seed=5)
    feats = extract(ext, torch.from_numpy(fake), progress=False).features
    assert res["kid"] == kid(feats, ref.features, 7, 30, 5)[0] and res["kid_subset_size"] == 30
    assert "kid" not in evaluate_samples(ext, torch.from_numpy(fake), ref, fd_method="eigh", progress=False,
                                         kid_subsets=0)


def test_tost_equivalence_uses_the_90_percent_interval():
    from deltafm.study.paired import equivalence

    d = [0.1, 0.2, 0.3]  # mean 0.2, sd 0.1, t_{0.95, 2} = 2.919985580 -> half-width 0.16859
    ok, lo, hi = equivalence(d, margin=0.4)
    assert ok and lo == pytest.approx(0.2 - 2.919985580 * 0.1 / 3**0.5) and hi == pytest.approx(0.3685857, rel=1e-6)
    assert equivalence(d, margin=0.35)[0] is False  # the upper bound 0.369 reaches past the margin
    assert equivalence([0.1], 1.0) is None
    with pytest.raises(ValueError, match="margin"):
        equivalence(d, 0.0)


def test_combine_seeds_means_and_keeps_each_seed():
    from deltafm.study.evaluator import combine_seeds, unit_seeds

    one = {"fd": 2.0, "acc": 0.5}
    assert combine_seeds([one]) == one
    both = combine_seeds([one, {"fd": 4.0, "acc": 0.7}])
    assert both["fd"] == 3.0 and both["acc"] == pytest.approx(0.6)
    assert both["per_seed"] == {"fd": [2.0, 4.0], "acc": [0.5, 0.7]}
    assert unit_seeds({"seed": 4}) == [4] and unit_seeds({"seeds": [1, 2]}) == [1, 2]


def test_provenance_names_the_commit_versions_and_machine():
    import torch

    from deltafm.provenance import environment

    env = environment()
    assert env["torch"] == torch.__version__ and env["cores"] >= 1 and env["cpu"]
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one)
        assert env["commit"] == head.stdout.strip() and isinstance(env["dirty"], bool)


def test_provenance_outside_a_git_checkout_reads_deltafm_commit(tmp_path, monkeypatch):
    from deltafm.provenance import git_commit

    monkeypatch.delenv("DELTAFM_COMMIT", raising=False)
    assert git_commit(tmp_path) == (None, None)
    monkeypatch.setenv("DELTAFM_COMMIT", "abc123")
    assert git_commit(tmp_path) == ("abc123", None)
