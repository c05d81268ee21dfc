#!/usr/bin/env bash
# Keep a study's finished (arm, seed) records in the repository while the study spans several sessions or
# machines, and put them back before resuming. The runner skips every unit recorded in
# OUT/results/<arm>/seed<k>.json, so restored records resume the study where it stopped (units of an
# (arm, seed) that was still training are redone from its start: checkpoints are not kept).
#
#   bash scripts/study_records.sh save NAME      # runs/compare/NAME/results -> docs/figures/compare/NAME-units
#   bash scripts/study_records.sh restore NAME   # docs/figures/compare/NAME-units -> runs/compare/NAME/results
#
# Once the study is complete, its results.json (copied by the report's --copy-results) holds every unit:
# delete the NAME-units folder then.
set -euo pipefail
usage() { echo "usage: bash scripts/study_records.sh save|restore NAME" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1 name=$2
root=$(cd "$(dirname "$0")/.." && pwd)
run="$root/runs/compare/$name/results"
kept="$root/docs/figures/compare/$name-units"
case "$action" in
  save)
    [ -d "$run" ] || { echo "error: no records under $run" >&2; exit 2; }
    mkdir -p "$kept"
    cp -r "$run"/. "$kept"/
    echo "saved $(find "$kept" -name 'seed*.json' | wc -l) records to $kept" ;;
  restore)
    [ -d "$kept" ] || { echo "error: no saved records under $kept" >&2; exit 2; }
    mkdir -p "$run"
    cp -rn "$kept"/. "$run"/
    echo "restored $(find "$run" -name 'seed*.json' | wc -l) records under $run" ;;
  *) usage ;;
esac
