#!/usr/bin/env bash
# Commit the summaries of a study that finished since the last commit, with docs/results.md's sections of that study
# regenerated (for cpu_smollm2_ii: the sections tagged @cpu_smollm2_ii). Safe while the study runs in the background
# (summaries are written atomically; a run in progress has none yet).
#
#   studies/collect.sh                      # studies/cpu_smollm2_ii.yaml
#   studies/collect.sh studies/<other>.yaml
set -eu
cd "$(dirname "$0")/.."
study=${1:-studies/cpu_smollm2_ii.yaml}
name=$(.venv/bin/python -m fedsoda_mpi.study name "$study")
.venv/bin/python analysis/report.py "results/$name" --out docs/results.md
git add "results/$name" docs/results.md
if git diff --cached --quiet; then
  echo "collect: nothing new in results/$name"
  exit 0
fi
new=$(git diff --cached --name-only --diff-filter=A -- "results/$name" | grep -c '\.json$' || true)
done_runs=$(.venv/bin/python -m fedsoda_mpi.study list "$study" | grep -c '^  done' || true)
all_runs=$(.venv/bin/python -m fedsoda_mpi.study list "$study" | grep -c '^  ' || true)
git commit -qm "results/$name: $new new summaries ($done_runs of $all_runs runs done); docs/results.md regenerated"
git log --oneline -1
