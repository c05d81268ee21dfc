"""This tree against an earlier commit, side by side: the main job's wall time and the ΔFM/FM step ratio.

A refactor should not make training slower. This benchmark extracts ``--ref`` (default: the commit before
the issue-8 reshaping) with ``git archive`` into a temporary folder and runs, alternately in fresh
processes with 1 thread each (``ref, new, new, ref, ...``, so drifts in machine load hit both):

* **main job**: README's main job (``deltafm train --preset fmnist-unet-deltafm``) cut to ``--steps``
  steps, no sample grids, one final checkpoint; reported: wall time of the whole command (imports, data
  loading, set-up, training, checkpoint) and the median training step time from its ``log.jsonl``;
* **ΔFM/FM**: each tree's own ``benchmarks/bench_train.py`` functions: the paired ΔFM/FM step-time ratio
  on the UNet (``bench``) and the cost of the ΔFM term around a trivial model (``objective_overhead``).

Ratios new/ref are medians of per-round ratios. The matmul rate of the machine is measured in the same run.

    .venv/bin/python benchmarks/bench_versions.py [--ref 822e045] [--rounds 3] [--steps 20] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- bench_versions:begin -->", "<!-- bench_versions:end -->"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_STEP_PROBE = """
import json, sys
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
import bench_train as b
o = b.objective_overhead(128, {rounds}, "bf16")
r = b.bench("fmnist-unet-deltafm", 128, {reps}, 2, "bf16", 1.0)
print(json.dumps({{"extra_ms": o["extra"], "fm_obj_ms": o["fm"], "ratio": r["ratio"], "dfm_ms": r["dfm_ms"]}}))
"""


def extract(ref: str, dest: Path) -> str:
    """``git archive ref`` into ``dest``; returns the full commit id."""
    commit = subprocess.check_output(["git", "rev-parse", ref], cwd=ROOT, text=True).strip()
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def main_job(tree: Path, out: Path, steps: int) -> dict[str, float]:
    """Run the cut main job with ``tree``'s sources; wall time and median step time."""
    cmd = [sys.executable, "-m", "deltafm", "train", "--preset", "fmnist-unet-deltafm", "--out", str(out),
           f"train.total_images={128 * steps}", "train.threads=1", "train.ckpt_every=100000",
           "sample.every=-1", "log.progress_bar=false", "log.tensorboard=false", "log.every=5"]
    env = {**ENV, "PYTHONPATH": str(tree / "src")}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps_s = [r["s_per_step"] for r in rows if "s_per_step" in r][1:]  # the first window includes warm-up
    return {"wall_s": wall, "step_s": statistics.median(steps_s)}


def step_probe(tree: Path, rounds: int, reps: int) -> dict[str, float]:
    code = _STEP_PROBE.format(bench=str(tree / "benchmarks"), rounds=rounds, reps=reps)
    env = {**ENV, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _matmul_peak() -> float:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from deltafm.train.logging import measure_matmul_peak

    torch.set_num_threads(1)
    return measure_matmul_peak(torch.device("cpu"), torch.bfloat16)


def _ci(ratios: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of per-round ratios."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def run(ref: str, rounds: int, steps: int, probe_rounds: int, probe_reps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="deltafm-ref-") as tmp:
        tmp_p = Path(tmp)
        (tmp_p / "ref").mkdir()
        commit = extract(ref, tmp_p / "ref")
        trees = {"ref": tmp_p / "ref", "new": ROOT}
        res: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
        for r in range(rounds):
            for k in (("ref", "new") if r % 2 == 0 else ("new", "ref")):
                m = main_job(trees[k], tmp_p / f"run-{k}-{r}", steps)
                p = step_probe(trees[k], probe_rounds, probe_reps)
                for name, v in {**m, **p}.items():
                    res[k].setdefault(name, []).append(v)
                print(f"round {r} {k}: {json.dumps({**m, **p})}", flush=True)
    keys = list(res["new"])
    per_round = {name: [n / f for n, f in zip(res["new"][name], res["ref"][name])] for name in keys}
    ratio = {name: statistics.median(v) for name, v in per_round.items()}
    ci = {name: _ci(v) for name, v in per_round.items()}
    med = {k: {name: statistics.median(v) for name, v in res[k].items()} for k in res}
    return {"ref": ref, "commit": commit, "rounds": rounds, "steps": steps, "median": med,
            "ratio_new_over_ref": ratio, "ci": ci, "peak_gflops_bf16": _matmul_peak() / 1e9,
            "load": os.getloadavg()[0]}


def _section(r: dict, argv: list[str]) -> str:
    m, q = r["median"], r["ratio_new_over_ref"]
    rows = [
        ("main job: wall time of the command (s)", "wall_s", 1, "{:.1f}"),
        ("main job: median training step (ms)", "step_s", 1000, "{:.0f}"),
        ("UNet ΔFM step (ms, bench_train.bench)", "dfm_ms", 1, "{:.0f}"),
        ("ΔFM/FM step ratio (bench_train.bench)", "ratio", 1, "{:.4f}"),
        ("ΔFM term around a trivial model (ms)", "extra_ms", 1, "{:.3f}"),
    ]
    lines = [
        "## This tree against an earlier commit (`benchmarks/bench_versions.py`)", "",
        f"Command: `python benchmarks/bench_versions.py {' '.join(argv)}`  ",
        f"Reference: {r['ref']} = `{r['commit'][:12]}`; {r['rounds']} interleaved rounds, each a fresh process with "
        f"1 thread; main job = fmnist-unet-deltafm cut to {r['steps']} steps. Machine: {platform.machine()} CPU, "
        f"bf16 matmul {r['peak_gflops_bf16']:.0f} GFLOP/s measured in the same run; load average at the end "
        f"{r['load']:.1f} on {os.cpu_count()} cores.", "",
        "| measure | reference | this tree | this / reference (median of per-round ratios, 95% bootstrap CI) |",
        "|---|---|---|---|",
    ]
    for label, key, scale, fmt in rows:
        lines.append(f"| {label} | {fmt.format(m['ref'][key] * scale)} | {fmt.format(m['new'][key] * scale)} | "
                     f"{q[key]:.3f} ({r['ci'][key][0]:.3f}–{r['ci'][key][1]:.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", default="822e045", help="commit to compare against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="training steps of the cut main job")
    p.add_argument("--probe-rounds", type=int, default=200, help="objective_overhead rounds")
    p.add_argument("--probe-reps", type=int, default=6, help="bench rounds (FM and ΔFM UNet steps)")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    r = run(args.ref, args.rounds, args.steps, args.probe_rounds, args.probe_reps)
    section = _section(r, [a for a in argv if a != "--write"] + ["--write"] if args.write else argv)
    print(section)
    if args.write:
        text = RESULTS.read_text()
        block = f"{BEGIN}\n{section}{END}"
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
