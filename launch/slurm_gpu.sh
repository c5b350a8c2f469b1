#!/usr/bin/env bash
# Write and submit an sbatch script that trains DeiT on several GPU nodes of a SLURM cluster.
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --workdir DIR [flags] [--config.KEY=VALUE ...] [-- ARGS]

Writes an sbatch script (--script) that runs, with one task per node,
  srun PYTHON -m deit_jax.main --config=CONFIG --workdir=WORKDIR --distributed=on ...
from this checkout (which must be on a filesystem the nodes share), and submits it. Each
process drives all GPUs of its node; jax.distributed finds the coordinator through SLURM.
SLURM sends SIGTERM 120 s before --time runs out, so the trainer saves a checkpoint; the
script can be submitted again (see --chain) and resumes from WORKDIR.
Arguments --config.KEY=VALUE, and everything after --, are passed on to deit_jax.main.

Flags:
  --workdir DIR          Run directory on storage every node reaches (shared FS or gs://).
                         Required.
  --config FILE[:ARG]    Config. Default: configs/deit_s.py.
  --nodes N              Nodes. Default: 1.
  --gpus-per-node N      GPUs per node. Default: 8.
  --cpus-per-task N      CPUs for each node's process (input pipeline). Default: SLURM's.
  --partition NAME       Partition. Default: SLURM's.
  --account NAME         Account to charge. Default: SLURM's.
  --time D-HH:MM:SS      Time limit of each job. Default: 24:00:00.
  --job-name NAME        Job name. Default: deit-jax.
  --python PATH          Python with requirements.txt and jax[cuda12] installed. Default: python3.
  --script PATH          Where to write the sbatch script. Default: workdirs/slurm/JOB_NAME.sbatch
                         in this checkout (job logs go next to it).
  --chain N              Submit N jobs that run one after another (--dependency=singleton),
                         each resuming where the last one stopped. Default: 1.
  --dry-run              Print the commands, the script included, without running them.
  -h, --help             Show this help.
EOF
}

workdir="" config="configs/deit_s.py" nodes=1 gpus_per_node=8 cpus_per_task="" partition=""
account="" time_limit="24:00:00" job_name="deit-jax" python="python3" script="" chain=1
passthrough=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --workdir | --workdir=*) take_value "$@"; workdir=$VALUE; shift "$SHIFT" ;;
    --config | --config=*) take_value "$@"; config=$VALUE; shift "$SHIFT" ;;
    --nodes | --nodes=*) take_value "$@"; nodes=$VALUE; shift "$SHIFT" ;;
    --gpus-per-node | --gpus-per-node=*) take_value "$@"; gpus_per_node=$VALUE; shift "$SHIFT" ;;
    --cpus-per-task | --cpus-per-task=*) take_value "$@"; cpus_per_task=$VALUE; shift "$SHIFT" ;;
    --partition | --partition=*) take_value "$@"; partition=$VALUE; shift "$SHIFT" ;;
    --account | --account=*) take_value "$@"; account=$VALUE; shift "$SHIFT" ;;
    --time | --time=*) take_value "$@"; time_limit=$VALUE; shift "$SHIFT" ;;
    --job-name | --job-name=*) take_value "$@"; job_name=$VALUE; shift "$SHIFT" ;;
    --python | --python=*) take_value "$@"; python=$VALUE; shift "$SHIFT" ;;
    --script | --script=*) take_value "$@"; script=$VALUE; shift "$SHIFT" ;;
    --chain | --chain=*) take_value "$@"; chain=$VALUE; shift "$SHIFT" ;;
    --config.*=*) passthrough+=("$1"); shift ;;
    --config.*) die "write config overrides as $1=VALUE" ;;
    --) shift; passthrough+=("$@"); break ;;
    *) die "unknown flag $1" ;;
  esac
done
require "$workdir" --workdir
for pair in "$nodes:--nodes" "$gpus_per_node:--gpus-per-node" "$chain:--chain"; do
  [[ ${pair%%:*} =~ ^[1-9][0-9]*$ ]] || die "${pair#*:} must be a positive integer, got '${pair%%:*}'"
done
[[ -z $cpus_per_task || $cpus_per_task =~ ^[1-9][0-9]*$ ]] ||
  die "--cpus-per-task must be a positive integer, got '$cpus_per_task'"
[[ $job_name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name may only hold letters, digits and _.-"
[[ -n $script ]] || script="$REPO_ROOT/workdirs/slurm/$job_name.sbatch"
[[ $script == /* ]] || script="$PWD/$script"
log_dir=$(dirname "$script")

local_ids=$(seq -s, 0 $((gpus_per_node - 1)))
train=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$python" -m deit_jax.main
  "--config=$config" "--workdir=$workdir" --distributed=on "${passthrough[@]}")

sbatch_script() {
  echo '#!/usr/bin/env bash'
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo '#SBATCH --ntasks-per-node=1'
  echo "#SBATCH --gpus-per-node=$gpus_per_node"
  [[ -z $cpus_per_task ]] || echo "#SBATCH --cpus-per-task=$cpus_per_task"
  [[ -z $partition ]] || echo "#SBATCH --partition=$partition"
  [[ -z $account ]] || echo "#SBATCH --account=$account"
  echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --output=$log_dir/%x-%j.out"
  # SIGTERM to every task 2 minutes before the time limit: the trainer checkpoints and exits.
  echo '#SBATCH --signal=TERM@120'
  echo "# Written by launch/slurm_gpu.sh. Submitting it again resumes the run from its workdir."
  echo 'set -euo pipefail'
  echo "cd $(quote "$REPO_ROOT")"
  echo '# One process per node drives all of its GPUs. Without this, JAX'"'"'s SLURM detection'
  echo '# would give each process only the GPU numbered like its local rank.'
  echo "export JAX_LOCAL_DEVICE_IDS=$local_ids"
  quote_cmd "${train[@]}"
  echo
}

submit=(sbatch "$script")
((chain == 1)) || submit=(sbatch --dependency=singleton "$script")

run mkdir -p "$log_dir"
if ((DRY_RUN)); then
  printf "cat > %s <<'DEIT_JAX_SBATCH'\n" "$(quote "$script")"
  sbatch_script
  echo DEIT_JAX_SBATCH
else
  sbatch_script >"$script"
  log "wrote $script"
fi
for ((i = 0; i < chain; i++)); do
  run "${submit[@]}"
done
