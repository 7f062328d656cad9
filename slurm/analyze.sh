#!/bin/bash
# Figures and tables of every run under $RUN_ROOT, from the HDF5 run files only (nothing is re-run):
# $RUN_ROOT/figures/{rounds,comm,distance_profile_<run>}.{png,pdf} and table.{md,tex}. Run files are found one
# level down (single jobs: $RUN_ROOT/<job>-<id>/run.h5) and two levels down (study runs:
# $RUN_ROOT/<study>/<run id>/run.h5). Unfinished or failed runs are skipped with a warning by each script.
#
#   sbatch slurm/analyze.sh                                             # after the runs (submit it yourself:
#                                                                       # submit_all.sh's last job is the report)
#   sbatch --dependency=afterany:<job id> slurm/analyze.sh              # or chained after a job
#   RUN_ROOT=/scratch/me/runs FIGURES=/home/me/figs bash slurm/analyze.sh
#
# Knobs: FIGURES (output folder, default $RUN_ROOT/figures) and slurm/common.sh's.
#SBATCH --job-name=analyze
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out

source "${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
shopt -s nullglob
runs=("$RUN_ROOT"/*/run.h5 "$RUN_ROOT"/*/*/run.h5)
[ ${#runs[@]} -gt 0 ] || fedsoda_die "no run files $RUN_ROOT/*/run.h5 or $RUN_ROOT/*/*/run.h5"
out=${FIGURES:-$RUN_ROOT/figures}
fedsoda_log "${#runs[@]} run files -> $out"
for script in plot_rounds plot_comm plot_distance_profile; do
  "$FEDSODA_PYTHON" "analysis/$script.py" "${runs[@]}" --out "$out"
done
"$FEDSODA_PYTHON" analysis/table.py "${runs[@]}" --latex --out "$out" >/dev/null
"$FEDSODA_PYTHON" analysis/table.py "${runs[@]}" --out "$out"
