#!/bin/bash
# ODA ablation (Table 3 of the paper): pre-alignment and re-alignment switched on/off, one array task
# per combination. Default job: jobs/llama3_boolq_iid.yaml (the paper's ablation task is BoolQ).
#
#   sbatch slurm/ablation.sh                                            # 4 tasks: (pre, re) = (no,no) (yes,no) (no,yes) (yes,yes)
#   JOB_CONFIG=jobs/llama3_gsm8k_iid.yaml sbatch slurm/ablation.sh
#
# Environment knobs and the MPI route: slurm/common.sh. Output: $RUN_ROOT/ablation-pre<bool>-re<bool>-<array job>_<task>/.
#SBATCH --job-name=ablation
#SBATCH --array=0-3
#SBATCH --ntasks=11
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

source "${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
setting=$(fedsoda_pick false,false true,false false,true true,true)
IFS=, read -r pre re <<<"$setting"
RUN_TAG=pre$pre-re$re fedsoda_run jobs/llama3_boolq_iid.yaml "oda.pre_align=$pre" "oda.re_align=$re"
