#!/bin/bash
# The five-minute smoke check (python -m fedsoda_mpi.smoke; its docstring lists the steps): submit it first on a
# new cluster, before any real job. It prints one PASS/FAIL line per step into smoke-<job id>.out and fails the
# job at the first FAIL (exit 1; 2 when the device setting cannot hold).
#
#   sbatch slurm/smoke.sh                                    # from the repo root, after slurm/prepare.sh
#   SMOKE_DEVICE=cuda sbatch slurm/smoke.sh                  # refuse the CPU fallback (FAIL without a GPU)
#   SMOKE_ARGS="--model tiny" sbatch slurm/smoke.sh          # more arguments of fedsoda_mpi.smoke
#
# The in-process steps (NF4 bundle, LoRA gradients, a FedSODA and a FedSRD round, drift probe, plug-in) run in
# this batch shell on the node's first GPUs (server cuda:0, client cuda:1); the MPI round is a job step of the 3
# tasks, one GPU each, started like every other script's step (slurm/common.sh: srun --mpi=pmix, or
# FEDSODA_LAUNCHER=mpirun). Device auto: where the ranks see no GPU they run on the CPU, and /devices says so
# (the step then FAILs only if the batch shell saw a GPU that the ranks did not).
#SBATCH --job-name=smoke
#SBATCH --ntasks=3
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out

source "${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
smoke_args=()
read -r -a smoke_args <<<"${SMOKE_ARGS:-}"
fedsoda_log "smoke check on ${SLURM_JOB_NODELIST:-$(hostname -s)}: ${SLURM_NTASKS:-1} tasks, GPUs per task" \
  "${SLURM_GPUS_PER_TASK:-none}, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
"$FEDSODA_PYTHON" -m fedsoda_mpi.smoke --device "${SMOKE_DEVICE:-auto}" --launcher "$FEDSODA_LAUNCHER" \
  "${smoke_args[@]}"
