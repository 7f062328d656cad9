#!/bin/bash
# Non-IID study (Figure 3 of the paper): label skew from a Dirichlet(beta) split over the clients, one
# array task per beta. Default job: jobs/llama3_gsm8k_iid.yaml with data.split=dirichlet.
#
#   sbatch slurm/noniid.sh                                              # beta = 0.1, 0.5, 1.0
#   sbatch --array=0 slurm/noniid.sh                                   # only beta = 0.1
#   JOB_CONFIG=jobs/qwen2_sst2_iid.yaml sbatch slurm/noniid.sh
#
# Environment knobs and the MPI route: slurm/common.sh. Output: $RUN_ROOT/noniid-beta<beta>-<array job>_<task>/.
#SBATCH --job-name=noniid
#SBATCH --array=0-2
#SBATCH --ntasks=11
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

source "${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
beta=$(fedsoda_pick 0.1 0.5 1.0)
RUN_TAG=beta$beta fedsoda_run jobs/llama3_gsm8k_iid.yaml data.split=dirichlet "data.dirichlet_beta=$beta"
