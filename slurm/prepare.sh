#!/bin/bash
# Prepare everything the compute nodes need offline: the models (fetched/converted into
# $FEDSODA_MODELS) and the task data (cached in $FEDSODA_DATA). Idempotent: prepared models are
# found by their marker file and skipped, the data files are verified against their checksums.
#
#   bash slurm/prepare.sh                                               # on the login node (needs the internet)
#   HF_TOKEN=hf_... bash slurm/prepare.sh                               # gated models (Llama-3, Mistral): a token
#                                                                       # (or `huggingface-cli login` once)
#   sbatch slurm/prepare.sh                                             # as a CPU job, where compute nodes are online
#   JOB_CONFIG=jobs/smollm2_sst2_iid.yaml bash slurm/prepare.sh         # only what one job needs
#
# Models: the model.name of every job file in $PREPARE_CONFIGS (space-separated), else $JOB_CONFIG,
# else jobs/*.yaml (names that are existing folders are used as they are). Knobs: slurm/common.sh.
#SBATCH --job-name=prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out

source "${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
export HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0  # this job downloads (common.sh makes the other jobs offline)
read -r -a configs <<<"${PREPARE_CONFIGS:-${JOB_CONFIG:-$(echo jobs/*.yaml)}}"
read -r -a overrides <<<"${FEDSODA_OVERRIDES:-}"
models=$("$FEDSODA_PYTHON" -c '
import sys
from pathlib import Path
from fedsoda_mpi.config import load_config
configs, overrides = sys.argv[1].split(), sys.argv[2].split()
names = {load_config(c, overrides).model.name for c in configs}
print(" ".join(sorted(n for n in names if not Path(n).expanduser().is_dir())))' "${configs[*]}" "${overrides[*]}")
for model in $models; do
  fedsoda_log "prepare model $model"
  "$FEDSODA_PYTHON" -m fedsoda_mpi.prepare model "$model"
done
fedsoda_log "prepare data"
"$FEDSODA_PYTHON" -m fedsoda_mpi.prepare data
