#!/usr/bin/env bash
# Runs a study in the background, one run at a time, each pass a fresh `study run --max-runs 1`: the study file and
# study.py are read again between runs (groups added to the file are picked up without a restart; the run code
# itself is whatever this checkout holds). Stops when a pass starts nothing (all done, or only runs waiting for a
# selection), on a study error (exit 2) or when a run was stopped (exit 75/143: `kill -USR1 <pid of the study
# python>` checkpoints the run at the end of its round; the same command resumes it).
#
#   setsid nohup nice -n 19 studies/run_bg.sh studies/cpu_smollm2_ii.yaml > runs/cpu_smollm2_ii.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
study=${1:?usage: studies/run_bg.sh <study.yaml> [study run options]}
shift
while true; do
  out=$(mktemp)
  .venv/bin/python -m fedsoda_mpi.study run "$study" --max-runs 1 "$@" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  started=$(grep -cE '^\[study [0-9:]+\] .* \(lr [^)]*\): ' "$out")
  rm -f "$out"
  if [ "$rc" -eq 2 ] || [ "$rc" -eq 75 ] || [ "$rc" -eq 143 ] || [ "$rc" -eq 130 ]; then
    echo "[run_bg $(date -u +%H:%M:%S)] stopped (exit code $rc)"; exit "$rc"
  fi
  if [ "$started" -eq 0 ]; then
    echo "[run_bg $(date -u +%H:%M:%S)] nothing left to start (exit code $rc)"; exit "$rc"
  fi
done
