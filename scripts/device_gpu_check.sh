#!/usr/bin/env bash
# Issue 14's one-shot GPU check, as run on a lent CUDA machine (the device tool's `run`), in one call:
# benchmarks/gpu_check.py (SiT-XL/2 ΔFM training with bf16 + compile + fused AdamW on synthetic latents, CFG
# sampling at NFE 50, MFU against the matmul rate it measures, peak memory, host-sync check), then the
# side-by-side harness against the reference SiT (SiT-B/2 and SiT-XL/2). Output goes to $OUT (or runs/gpu).
#
# Such a machine has python3 with CUDA torch, tqdm, safetensors, PyYAML and matplotlib but no network and
# perhaps no git, so deltafm runs from src/ and the reference's models/sit.py travels as one ignored file.
# Before the call, here:
#   echo /.ref/ >> .git/info/exclude; mkdir -p .ref
#   git --git-dir=PATH/TO/gstoica27+DeltaFM/repo show HEAD:models/sit.py > .ref/sit.py
# The call: command "bash scripts/device_gpu_check.sh", carry [".ref"], timeout_s 560. Without .ref/sit.py
# the side-by-side part is skipped. Record the printed numbers in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-runs/gpu}
mkdir -p "$out"
{ date -u; nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
  2>&1 | tee "$out/device.txt"
ref=()
if [ -f .ref/sit.py ]; then ref=(--mirror .ref/sit.py); else echo "no .ref/sit.py: side-by-side part skipped"; fi
timeout 520 python3 benchmarks/gpu_check.py "${ref[@]}" 2>&1 | tee "$out/gpu_check.log"
echo "status ${PIPESTATUS[0]}" | tee -a "$out/gpu_check.log"
