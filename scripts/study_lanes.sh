#!/usr/bin/env bash
# Run (arm, seed) units of the comparison studies one after another in one process of one thread (a "lane"),
# and copy each finished unit's record into the repository (scripts/study_records.sh save) as soon as it is
# done, so that a crash or a machine reset loses at most the unit that was running. Two lanes fill the
# 2-core machine:
#
#   mkdir -p runs/logs
#   setsid nohup bash scripts/study_lanes.sh scripts/lanes/issue13-a.txt > runs/logs/lane-a.log 2>&1 &
#   setsid nohup bash scripts/study_lanes.sh scripts/lanes/issue13-b.txt > runs/logs/lane-b.log 2>&1 &
#
# A lane file holds one unit per line, "NAME ARM SEED": the study configs/compare/NAME.yaml, output
# runs/compare/NAME; '#' starts a comment. The whole file is checked before anything runs. Before its first
# unit of a study, a lane restores that study's saved records (so a fresh clone resumes where the last
# machine stopped); the runner skips every recorded unit, so running a lane again resumes it. Commit
# docs/figures/compare/NAME-units to keep the records. Afterwards, per study:
#   deltafm compare --config configs/compare/NAME.yaml --out runs/compare/NAME --report-only
# and the report command of docs/RESULTS.md.
#
# Environment: PY (default .venv/bin/python, else python3); any DELTAFM_COMMIT / PYTHONPATH is passed on
# (to run the studies from a frozen worktree while the checkout changes).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: bash scripts/study_lanes.sh LANE_FILE" >&2; exit 2; }
lane=$1
root=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$lane" ] || { echo "error: no lane file $lane" >&2; exit 2; }
if [ -z "${PY:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PY="$root/.venv/bin/python"; else PY=python3; fi
fi
units=()
n=0
while IFS= read -r line || [ -n "$line" ]; do
  n=$((n + 1))
  line=${line%%#*}
  read -r -a f <<< "$line" || true
  [ ${#f[@]} -eq 0 ] && continue
  if [ ${#f[@]} -ne 3 ] || ! [[ ${f[2]} =~ ^[0-9]+$ ]]; then
    echo "error: $lane:$n: expected 'NAME ARM SEED', got '$line'" >&2; exit 2
  fi
  [ -f "$root/configs/compare/${f[0]}.yaml" ] || {
    echo "error: $lane:$n: no study config configs/compare/${f[0]}.yaml" >&2; exit 2; }
  units+=("${f[0]} ${f[1]} ${f[2]}")
done < "$lane"
[ ${#units[@]} -gt 0 ] || { echo "error: $lane names no unit" >&2; exit 2; }
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$root"
mkdir -p runs/logs
restored=" "
i=0
for u in "${units[@]}"; do
  read -r name arm seed <<< "$u"
  i=$((i + 1))
  if [[ $restored != *" $name "* ]] && [ -d "docs/figures/compare/$name-units" ]; then
    bash scripts/study_records.sh restore "$name"
  fi
  restored+="$name "
  log="runs/logs/$name-$arm-$seed.log"
  echo "[$(date '+%F %T')] unit $i/${#units[@]}: $name $arm seed $seed (log $log)"
  t0=$(date +%s)
  if "$PY" -m deltafm.study --config "configs/compare/$name.yaml" --out "runs/compare/$name" --arms "$arm" \
      --seeds "$seed" --no-report --quiet > "$log" 2>&1; then
    bash scripts/study_records.sh save "$name" > /dev/null
    echo "[$(date '+%F %T')] done in $(( $(date +%s) - t0 )) s; records saved to docs/figures/compare/$name-units"
  else
    rc=$?
    echo "[$(date '+%F %T')] failed (status $rc) after $(( $(date +%s) - t0 )) s; see $log" >&2
    exit "$rc"
  fi
done
echo "[$(date '+%F %T')] lane $lane finished"
