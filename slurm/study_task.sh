#!/bin/bash
# One run of a study: the SLURM_ARRAY_TASK_ID-th run of stage $STAGE of study file $STUDY
# (fedsoda_mpi/study.py expands it), as this job's MPI step; then its summary <results>/<run id>.json.
# slurm/submit_all.sh submits one array of this script per stage; by hand:
#
#   STUDY=studies/paper.yaml STAGE=grid sbatch --array=0-323 slurm/study_task.sh
#   STUDY=studies/cpu_smollm2.yaml STAGE=gap sbatch --array=0-8 --ntasks=3 --gpus-per-task=0 slurm/study_task.sh
#
# Knobs: STUDY, STAGE (required), STUDY_RESULTS (summaries, default results/<study name>), slurm/common.sh's.
# Runs go to $RUN_ROOT/<study name>/<run id> with resume=auto, so a requeued task (USR1 before the time
# limit, see common.sh) continues from its checkpoint. A run whose lr is "selected" needs the select job
# (slurm/study_select.sh) to have run after the grid stage.
#SBATCH --job-name=study
#SBATCH --ntasks=11
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

source "${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
[ -n "${STUDY:-}" ] && [ -n "${STAGE:-}" ] || fedsoda_die "set STUDY (a study file) and STAGE (one of its stages)"
name=$("$FEDSODA_PYTHON" -m fedsoda_mpi.study name "$STUDY") || exit 2
where=(--runs "$RUN_ROOT/$name" ${STUDY_RESULTS:+--results "$STUDY_RESULTS"})
task=${SLURM_ARRAY_TASK_ID:-0}
rc=0
args=$("$FEDSODA_PYTHON" -m fedsoda_mpi.study args "$STUDY" "$STAGE" "$task" "${where[@]}") || rc=$?
[ "$rc" -ne 3 ] || { fedsoda_log "$STAGE task $task: its summary exists already; nothing to do"; exit 0; }
[ "$rc" -eq 0 ] || exit 2
eval "set -- $args"  # the arguments are shell-quoted by the study module
fedsoda_step "$FEDSODA_PYTHON" -m mpi4py -m fedsoda_mpi.main "$@" || rc=$?
if [ "$rc" -ne 0 ]; then  # a failed summary (ranked last; a resubmitted task runs it again), the task fails
  "$FEDSODA_PYTHON" -m fedsoda_mpi.study summarize "$STUDY" "$STAGE" "$task" "${where[@]}" --failed "$rc"
  exit "$rc"
fi
"$FEDSODA_PYTHON" -m fedsoda_mpi.study summarize "$STUDY" "$STAGE" "$task" "${where[@]}"
fedsoda_log "summary written for $STAGE task $task"
