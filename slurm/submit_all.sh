#!/bin/bash
# A whole study as ONE Slurm dependency graph (run it on the login node, from the repository root):
#
#   prepare --afterok--> grid array --afterany--> select --afterok--> one array per other stage
#           (every run of the lr grid)             (lr chosen on      (seeds, ablation, param, noniid, ...)
#                                                   validation rows)          --afterany--> report
#
#   bash slurm/submit_all.sh studies/paper.yaml                # every method, model, task, seed of the paper
#   bash slurm/submit_all.sh studies/cpu_smollm2.yaml          # the CPU study (SUBMIT_RUN_ARGS="--gpus-per-task=0")
#   bash slurm/submit_all.sh --no-prepare studies/paper.yaml   # models and data already prepared (login node):
#                                                              # no prepare job; the grid array starts at once
#   SUBMIT_ARGS="--account=abc --partition=gpu" bash slurm/submit_all.sh studies/paper.yaml
#
# Usage: bash slurm/submit_all.sh [--no-prepare] STUDY_FILE (SUBMIT_PREPARE=0 is the same as --no-prepare).
# Environment (besides slurm/common.sh's, which every job inherits):
#   SUBMIT_ARGS       extra sbatch options for every job
#   SUBMIT_RUN_ARGS   extra sbatch options for the run arrays only (e.g. --time=08:00:00 --gpus-per-task=0)
#   STUDY_RESULTS     where the run summaries go                         [results/<study name>]
# The arrays ask for the study's ranks per run (np: --ntasks) and threads (--cpus-per-task). The report job
# writes $RUN_ROOT/<study name>/results.md from the summaries. A run that fails writes a failed summary
# (ranked last by the selection, listed by the report) and fails its array task; a task whose summary exists
# does nothing, so re-submitting the graph runs only what is missing.
# Job logs: $RUN_ROOT/logs/. Prints one line per job ("prepare ID" unless --no-prepare, "array ID STAGE N",
# "select ID", "report ID"); the last line is the report job's.
usage="usage: bash slurm/submit_all.sh [--no-prepare] STUDY_FILE   (e.g. studies/paper.yaml)"
prepare_job=${SUBMIT_PREPARE:-1}
if [ "${1:-}" = --no-prepare ]; then prepare_job=0; shift; fi
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then echo "$usage" >&2; exit 2; fi
FEDSODA_ROOT=${FEDSODA_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
source "$FEDSODA_ROOT/slurm/common.sh"
STUDY=$1
[ -f "$STUDY" ] || fedsoda_die "no study file $STUDY ($usage)"
read -r -a common_args <<<"${SUBMIT_ARGS:-}"
read -r -a run_args <<<"${SUBMIT_RUN_ARGS:-}"
logs=$RUN_ROOT/logs
mkdir -p "$logs"
name=$("$FEDSODA_PYTHON" -m fedsoda_mpi.study name "$STUDY") || exit 2
stages=$("$FEDSODA_PYTHON" -m fedsoda_mpi.study stages "$STUDY") || exit 2  # "stage runs ranks threads" lines
export STUDY STUDY_RESULTS

submit() {  # submit SBATCH_ARGS...: echo the job id (a failed submission ends the script: the graph is incomplete)
  local out
  out=$(sbatch --parsable "${common_args[@]}" "$@") && [ -n "$out" ] ||
    fedsoda_die "sbatch $* failed; jobs submitted so far are listed above (scancel them before retrying)"
  echo "${out%%;*}"
}

array() {  # array AFTER STAGE RUNS RANKS THREADS: one array of slurm/study_task.sh (after job AFTER if not ""); echo its id
  local -a after=()
  [ -z "$1" ] || after=(--dependency="afterok:$1")
  STAGE=$2 submit "${after[@]}" --array="0-$(($3 - 1))" --ntasks="$4" --cpus-per-task="$5" \
    -J "$name-$2" -o "$logs/%x-%A_%a.out" "${run_args[@]}" slurm/study_task.sh
}

prepare=""
if [ "$prepare_job" != 0 ]; then
  prepare=$(PREPARE_CONFIGS="$("$FEDSODA_PYTHON" -m fedsoda_mpi.study jobs "$STUDY")" \
    submit -o "$logs/%x-%j.out" slurm/prepare.sh)
  echo "prepare $prepare"
fi
ids=()
select_id=""
while read -r stage runs ranks threads; do
  if [ "$stage" = grid ]; then
    grid=$(array "$prepare" grid "$runs" "$ranks" "$threads")
    echo "array $grid grid $runs"
    # afterany: a failed grid run leaves a failed summary and is ranked last; the others still select
    select_id=$(submit --dependency="afterany:$grid" -o "$logs/%x-%j.out" slurm/study_select.sh)
    echo "select $select_id"
    ids+=("$grid" "$select_id")
  else
    id=$(array "${select_id:-$prepare}" "$stage" "$runs" "$ranks" "$threads")
    echo "array $id $stage $runs"
    ids+=("$id")
  fi
done <<<"$stages"
after=$(IFS=:; echo "${ids[*]}")
report=$(submit --dependency="afterany:$after" -o "$logs/%x-%j.out" --wrap \
  "cd '$FEDSODA_ROOT' && '$FEDSODA_PYTHON' analysis/report.py '${STUDY_RESULTS:-results/$name}' --out '$RUN_ROOT/$name/results.md'")
echo "report $report"
