#!/bin/bash
# Parameter study (Table 4 of the paper): pruning combination (n, p) in {(2,6), (3,4), (4,3)} (12
# layers pruned each) x re-alignment interval r in {2, 5, 10}, one array task per setting.
# Default job: jobs/llama3_boolq_iid.yaml (the paper's study task is BoolQ).
#
#   sbatch slurm/param_study.sh                                         # 9 tasks: index = 3 * i_np + i_r
#   sbatch --array=3-5 slurm/param_study.sh                             # only (n, p) = (3, 4)
#
# Environment knobs and the MPI route: slurm/common.sh. Output: $RUN_ROOT/param_study-n<n>p<p>r<r>-<array job>_<task>/.
#SBATCH --job-name=param_study
#SBATCH --array=0-8
#SBATCH --ntasks=11
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

source "${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
setting=$(fedsoda_pick 2,6,2 2,6,5 2,6,10 3,4,2 3,4,5 3,4,10 4,3,2 4,3,5 4,3,10)
IFS=, read -r n p r <<<"$setting"
RUN_TAG=n${n}p${p}r$r fedsoda_run jobs/llama3_boolq_iid.yaml "sgp.n=$n" "sgp.p=$p" "oda.every=$r"
