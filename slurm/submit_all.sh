#!/bin/bash
# A whole paper reproduction as ONE Slurm dependency graph (run it on the login node):
#
#   prepare (CPU) --afterok--> Table 2 runs: slurm/<model>_iid.sh x jobs/<model>_<task>_iid.yaml
#                 --afterok--> study arrays: slurm/noniid.sh, slurm/ablation.sh, slurm/param_study.sh
#   all of those  --afterok--> analyze (CPU): $RUN_ROOT/figures
#
#   bash slurm/submit_all.sh
#   MODELS=llama3 TASKS=gsm8k STUDIES= bash slurm/submit_all.sh         # one run + analysis
#   SUBMIT_ARGS="--account=abc --partition=gpu" bash slurm/submit_all.sh
#
# Environment (besides slurm/common.sh's, which every job inherits):
#   MODELS            model scripts slurm/<model>_iid.sh                [llama3 qwen2 mistral]
#   TASKS             tasks: job files jobs/<model>_<task>_iid.yaml      [gsm8k sst2 boolq]
#   STUDIES           array scripts slurm/<study>.sh (empty: none)        [noniid ablation param_study]
#   SUBMIT_ARGS       extra sbatch options for every job
#   SUBMIT_RUN_ARGS   extra sbatch options for the MPI jobs only (e.g. --ntasks=3 --time=01:00:00)
#   JOB_CONFIG        set: each model script and study uses this job file, once (a toy-size graph)
# A job whose dependency failed never runs (Slurm cancels it with kill_invalid_depend, else it stays
# pending with reason DependencyNeverSatisfied). Job logs: $RUN_ROOT/logs/. Prints one line per job;
# the last line is the analyze job's id.
FEDSODA_ROOT=${FEDSODA_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
source "$FEDSODA_ROOT/slurm/common.sh"
read -r -a common_args <<<"${SUBMIT_ARGS:-}"
read -r -a run_args <<<"${SUBMIT_RUN_ARGS:-}"
logs=$RUN_ROOT/logs
mkdir -p "$logs"

submit() {  # submit SBATCH_ARGS...: echo the job id
  local out
  out=$(sbatch --parsable "${common_args[@]}" "$@")
  echo "${out%%;*}"
}

prepare=$(submit -o "$logs/%x-%j.out" slurm/prepare.sh)
echo "prepare $prepare"
ids=()
for model in ${MODELS-llama3 qwen2 mistral}; do
  configs=()
  if [ -n "${JOB_CONFIG:-}" ]; then
    configs=("$JOB_CONFIG")
  else
    for task in ${TASKS-gsm8k sst2 boolq}; do configs+=("jobs/${model}_${task}_iid.yaml"); done
  fi
  for config in "${configs[@]}"; do
    [ -f "$config" ] || fedsoda_die "no job file $config"
    id=$(JOB_CONFIG=$config submit --dependency="afterok:$prepare" "${run_args[@]}" -J "$(basename "$config" .yaml)" \
      -o "$logs/%x-%j.out" "slurm/${model}_iid.sh")
    echo "run $id $model $config"
    ids+=("$id")
  done
done
for study in ${STUDIES-noniid ablation param_study}; do
  id=$(submit --dependency="afterok:$prepare" "${run_args[@]}" -o "$logs/%x-%A_%a.out" "slurm/$study.sh")
  echo "array $id $study"
  ids+=("$id")
done
after=$(IFS=:; echo "$prepare${ids[*]:+:${ids[*]}}")
analyze=$(submit --dependency="afterok:$after" -o "$logs/%x-%j.out" slurm/analyze.sh)
echo "analyze $analyze"
