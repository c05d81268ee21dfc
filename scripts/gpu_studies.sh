#!/usr/bin/env bash
# One-shot: FM-vs-ΔFM studies on one CUDA GPU (the device machine a task is sometimes lent), results to $OUT.
#
# The studies of docs/RESULTS.md take hours on the 2-core CPU machines; on one GPU the small models train in
# seconds. This runs the issue-13 power study (configs/compare/fmnist-unet-power.yaml) with training and
# evaluation on cuda, then as many further studies as the time left allows (STUDIES, in order), and copies each
# study's results.json and report into $OUT. Nothing is downloaded: the device machine has torch and the
# other dependencies; Fashion-MNIST travels as the ignored folder .data/fashion-mnist (carry it).
#
# Here, once per checkout:
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/ && echo /.data/ >> .git/info/exclude
# Then with the device tool (one call, ~10 min limit):
#   run(command="DELTAFM_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_studies.sh", carry=[".data"],
#       timeout_s=590)
# (the command string is sent as written: put the commit hash in it literally).
#
# Results are not bit-identical to CPU runs (other kernels); every record names its machine (provenance), and
# a study is only ever compared within itself. The CPU smoke check of this script: SMOKE=1 bash
# scripts/gpu_studies.sh (the digits smoke study on the CPU, a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-studies}
BUDGET_S=${BUDGET_S:-540}                 # stop starting studies after this many seconds
STUDIES=${STUDIES:-"fmnist-unet-power fmnist-unet-lambda fmnist-unet-convergence"}
DEVICE=cuda
THREADS=8
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
if [[ "${SMOKE:-0}" == 1 ]]; then
    STUDIES="digits-tiny"; DEVICE=cpu; THREADS=1; PY=${PY_SMOKE:-.venv/bin/python}
elif [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
    [[ -d .data/fashion-mnist ]] || { echo "error: no .data/fashion-mnist (see the header of $0)" >&2; exit 2; }
    mkdir -p /usr/share/datasets && cp -r .data/fashion-mnist /usr/share/datasets/
fi
mkdir -p "$OUT"
"$PY" - <<'EOF' | tee "$OUT/device.txt"
import platform, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor())
EOF
start=$(date +%s)
for s in $STUDIES; do
    if (( $(date +%s) - start > BUDGET_S )); then echo "time budget spent: $s not started"; break; fi
    echo "== $s ($(( $(date +%s) - start )) s)"
    # resumable: a second call with the same tree continues (only within one device lease: the disk is fresh)
    "$PY" -m deltafm.study --config "configs/compare/$s.yaml" --out "runs/compare/$s" --device "$DEVICE" \
        --train-device "$DEVICE" --threads "$THREADS" --quiet \
        || echo "study $s stopped (status $?): its finished units are in runs/compare/$s/results"
    "$PY" -m deltafm.study --config "configs/compare/$s.yaml" --out "runs/compare/$s" --report-only >/dev/null \
        || true
    [[ -f "runs/compare/$s/results.json" ]] && cp "runs/compare/$s/results.json" "$OUT/$s-results.json"
    [[ -f "runs/compare/$s/report/REPORT.md" ]] && cp "runs/compare/$s/report/REPORT.md" "$OUT/$s-REPORT.md"
done
echo "done in $(( $(date +%s) - start )) s; files in $OUT"
