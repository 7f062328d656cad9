#!/bin/bash
# FedSODA on Mistral-7B, IID over 10 clients (Table 2 of the paper): rank 0 = server, ranks 1-10 = clients,
# one GPU per rank. Default job: jobs/mistral_gsm8k_iid.yaml (GSM8K, the headline task).
#
#   sbatch slurm/mistral_iid.sh                                        # from the repo root, after slurm/prepare.sh
#   JOB_CONFIG=jobs/mistral_sst2_iid.yaml sbatch slurm/mistral_iid.sh  # another task
#   FEDSODA_OVERRIDES="fed.rounds=20 seed=1" sbatch slurm/mistral_iid.sh
#   sbatch --ntasks=3 --cpus-per-task=1 slurm/mistral_iid.sh           # toy size (CPU: ranks fall back to CPU)
#
# Environment knobs and the MPI route: slurm/common.sh. Output: $RUN_ROOT/mistral_iid-<job id>/.
#SBATCH --job-name=mistral_iid
#SBATCH --ntasks=11
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# --mem=0: all memory of each node (rank 0 loads the full LLM in host memory first; 7-8B in bf16 ~16 GB).

source "${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
fedsoda_run jobs/mistral_gsm8k_iid.yaml
