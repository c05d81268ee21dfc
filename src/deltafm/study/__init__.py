"""The FM-vs-ΔFM study (``deltafm compare``): flow matching and ΔFM side by side, same seed, same data
order, same budget.

    deltafm compare --config configs/compare/fmnist-unet.yaml --out runs/compare/fmnist-unet [--seeds 0 1 2]
    python -m deltafm.study --config ... --out ... [--arms fm dfm-0.05] [--dry-run] [--report-only]

A study (YAML, see ``configs/compare/``) names a base training config, **arms** (training configs given
as overrides of the base: FM is ``objective.lam: 0``, ΔFM ``lam > 0``, other negatives, other batch
sizes) and, per arm, **variants**: ways to sample the trained model (raw; with the ΔFM bias correction
v_FM = (1 − λ) v + λ ū, ``map: to_fm``; or an FM model mapped post hoc to the ΔFM optimum
v_λ = (v − λ ū) / (1 − λ), ``map: to_delta``). Every (arm, seed) is trained in-process with
:func:`deltafm.train.loop.train` and ``train.seed = seed``, so all arms of a seed start from the same
weights and read the same batches (for equal batch sizes); with uniform negatives FM (λ = 0) and ΔFM
even draw the same t, noise, label dropout and negative indices.

Evaluation stages, per variant (each a unit stored as soon as it is done):

* ``curve``: at every ``eval_every_images`` of training, ``curve.num`` samples with one sampler
  (metric against images seen);
* ``sweep``: at the end, each solver in ``sweep.solvers`` (euler, heun, sde) at each NFE in
  ``sweep.nfe`` (NFE = velocity evaluations per sample: euler/sde steps = NFE, heun steps = NFE/2;
  NFEs a solver cannot do, such as heun at 1 or sde at 1, are skipped);
* ``cfg``: at the end, classifier-free guidance scales ``cfg.scales`` (w = 1 is the unguided sweep);
* ``along``: at the end, the classifier accuracy of the predicted clean sample along t
  (:mod:`deltafm.eval.along_path`).

Metrics (:func:`deltafm.eval.features.evaluate_samples`, the one scoring function, with the study's
settings :data:`deltafm.study.evaluator.SCORING`) use the project classifier, trained on the *training*
split only (once, cached under ``OUT/classifier`` unless a path is given) and reference
statistics of the ``eval.reference_split`` (default: test) split, both read with the training data
builder from the base config's ``data`` section (name, root, image size, channels): classifier-FD
(``fd``), class accuracy of the samples against the labels they were generated for (``class_acc``),
precision/recall with k-NN manifolds (both sets of equal size), and the Inception Score computed with
the classifier (``is``).

**Text and multi-condition arms** (``conditioning.kind`` text or multi, on the shapes sets) are scored by the
attribute reader instead (``eval.scorer: attributes``, ``eval.reader``; :mod:`deltafm.study.attributes`):
every sampling unit is drawn once per ``eval.prompt_splits`` split (e.g. ``[test, heldout]``: seen and
held-out (shape, colour) pairs), sample i conditioned on the caption (the conditions) of item i of the split,
and scored by whole-prompt accuracy, agreement and per-attribute accuracy (``prompt_acc``, ``agreement``,
``acc.shape`` ... ``acc.relation``), or per-condition accuracy (``acc.<part>``, ``all_acc``, ``one_object``),
plus FD in the reader's features against the split's real images (``fd``). ``eval.cfg.part_scales`` adds
guidance on one part of a multi-condition at a time. The report repeats its sections per prompt split.

**Statistical power** (issue 13): ``eval.sample_seeds: [s1, s2, ...]`` draws every sampling unit once per
seed (the metric is the mean, ``per_seed`` keeps each seed's value, so the sampling error of a metric is
measured, not assumed); ``eval.kid_subsets: 100`` adds KID beside FD (:mod:`deltafm.eval.kid`, unbiased, so
comparable across sample counts); ``equivalence: {fd: 0.25}`` adds a two-one-sided-tests verdict to each
``comparisons`` pair (:mod:`deltafm.study.paired`; state the margin before the runs). Every results file
records where it was computed (:mod:`deltafm.provenance`: commit, dirty tree, torch/numpy/python versions,
CPU, cores, GPUs) per (arm, seed) and in ``results.json``'s ``provenance``.

Layout of ``OUT``::

    compare.yaml                 the resolved study
    classifier/                  classifier weights (+ .sha256) and reference statistics (.npz; with the
                                 attribute reader: ref-attributes-<dataset>-<split>.npz per prompt split)
    runs/<arm>/seed<k>/          the training run (checkpoints at every evaluation point, log.jsonl)
    results/<arm>/seed<k>.json   evaluation units of that arm and seed ("status": "done" when complete)
    samples/<variant>/seed<k>.png  final sample grid of the curve sampler (attribute reader: one per prompt
                                 split, samples/<variant>/<split>/seed<k>.png, each sample under its prompt)
    results.json                 everything collected (input of ``deltafm.study.report``)
    report/                      REPORT.md and figures

Resuming: run the same command again. An (arm, seed) whose units are all present is skipped without
loading anything; an interrupted training continues from its newest checkpoint (``--resume auto`` of
the training loop, bit-exact on the same machine); a unit whose settings changed (sample count, seed,
classifier) is recomputed from the kept checkpoints. A changed *training* config of an arm that already
has results is an error (use another ``--out``). Text arms are trained to the end in one process before
their units are evaluated (each training start encodes every caption of the training data).

Modules: :mod:`~deltafm.study.spec` (the study YAML as typed dataclasses), :mod:`~deltafm.study.plan`
(training configs, evaluation points, units), :mod:`~deltafm.study.evaluator` (classifier, reference
statistics, sampling and scoring), :mod:`~deltafm.study.attributes` (the same with the attribute reader),
:mod:`~deltafm.study.run` (training, resuming, results files),
:mod:`~deltafm.study.ratios` (steps-to-match, NFE-to-match), :mod:`~deltafm.study.results` (reading
results.json), :mod:`~deltafm.study.figures`, :mod:`~deltafm.study.report`, :mod:`~deltafm.study.report_context` and
:mod:`~deltafm.study.report_attributes` (the report), :mod:`~deltafm.study.cli` (``deltafm compare``).
"""

from deltafm.study.plan import METRICS_VERSION, eval_points, plan_units, resolve_train_config
from deltafm.study.ratios import first_reach, format_ratio, match_ratio, nfe_to_match, steps_to_match, summarize
from deltafm.study.run import FORMAT, collect_results, run_compare
from deltafm.study.spec import STAGES, CompareConfig, CompareError, load_compare_config, parse_compare_config

__all__ = [
    "FORMAT",
    "METRICS_VERSION",
    "STAGES",
    "CompareConfig",
    "CompareError",
    "collect_results",
    "eval_points",
    "first_reach",
    "format_ratio",
    "load_compare_config",
    "match_ratio",
    "nfe_to_match",
    "parse_compare_config",
    "plan_units",
    "resolve_train_config",
    "run_compare",
    "steps_to_match",
    "summarize",
]
