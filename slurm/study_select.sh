#!/bin/bash
# The learning-rate selection of a study, between its grid stage and the stages that run at the selected
# lr: <results>/selection.json (the lr with the best mean validation accuracy per method, task, model, split).
#
#   STUDY=studies/paper.yaml sbatch --dependency=afterok:<grid array id> slurm/study_select.sh
#
# Knobs: STUDY (required), STUDY_RESULTS, slurm/common.sh's.
#SBATCH --job-name=select
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --time=00:10:00
#SBATCH --output=%x-%j.out

source "${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
[ -n "${STUDY:-}" ] || fedsoda_die "set STUDY (a study file)"
"$FEDSODA_PYTHON" -m fedsoda_mpi.study select "$STUDY" ${STUDY_RESULTS:+--results "$STUDY_RESULTS"}
