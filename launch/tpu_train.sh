#!/usr/bin/env bash
# Start DeiT training in the background on every worker of a TPU VM slice, or follow its log.
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --workdir gs://BUCKET/runs/RUN [flags] [--config.KEY=VALUE ...] [-- ARGS]
       $PROG --name NAME --logs [--worker N]
       $PROG --name NAME --stop

Starts 'python -m deit_jax.main --config=CONFIG --workdir=WORKDIR --distributed=on' with nohup
on every worker (each writes --remote-dir/logs/train.log on its own disk) and returns. The
run resumes from the latest checkpoint in WORKDIR, so starting it again continues it.
Arguments --config.KEY=VALUE, and everything after --, are passed on to deit_jax.main.

Flags:
  --name NAME          TPU name. Required.
  --zone ZONE          Zone. Default: gcloud config compute/zone.
  --project PROJECT    Project. Default: gcloud config core/project.
  --config FILE[:ARG]  Config file (relative to the repo) and variant. Default: configs/deit_s.py.
  --workdir GS_PATH    Run directory (checkpoints, metrics), gs://... so all workers share it.
                       Required to start training.
  --remote-dir DIR     Code directory on the workers (as for tpu_setup.sh). Default: ~/deit-jax.
  --logs               Follow the training log of one worker instead of starting training.
  --worker N           With --logs: the worker whose log to follow. Default: 0.
  --stop               Send SIGTERM to the trainers: they save a checkpoint and exit.
  --dry-run            Print the commands, one per line, without running them.
  -h, --help           Show this help.
EOF
}

# The tilde is for the workers' shells to expand.
# shellcheck disable=SC2088
name="" zone="" project="" config="configs/deit_s.py" workdir="" remote_dir="~/deit-jax"
mode=train worker=0
passthrough=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name | --name=*) take_value "$@"; name=$VALUE; shift "$SHIFT" ;;
    --zone | --zone=*) take_value "$@"; zone=$VALUE; shift "$SHIFT" ;;
    --project | --project=*) take_value "$@"; project=$VALUE; shift "$SHIFT" ;;
    --config | --config=*) take_value "$@"; config=$VALUE; shift "$SHIFT" ;;
    --workdir | --workdir=*) take_value "$@"; workdir=$VALUE; shift "$SHIFT" ;;
    --remote-dir | --remote-dir=*) take_value "$@"; remote_dir=$VALUE; shift "$SHIFT" ;;
    --logs) mode=logs; shift ;;
    --stop) mode=stop; shift ;;
    --worker | --worker=*) take_value "$@"; worker=$VALUE; shift "$SHIFT" ;;
    --config.*=*) passthrough+=("$1"); shift ;;
    --config.*) die "write config overrides as $1=VALUE" ;;
    --) shift; passthrough+=("$@"); break ;;
    *) die "unknown flag $1" ;;
  esac
done
require "$name" --name
check_remote_dir "$remote_dir"
require_uint "$worker" --worker
gcloud_scope "$zone" "$project"
d=$remote_dir
ssh=(gcloud compute tpus tpu-vm ssh "$name" "${SCOPE[@]}")

case $mode in
  logs)
    run "${ssh[@]}" "--worker=$worker" "--command=tail -n +1 -F $d/logs/train.log"
    exit 0
    ;;
  stop)
    run "${ssh[@]}" --worker=all "--command=pkill -TERM -f '$TRAINER_PATTERN' || true"
    exit 0
    ;;
esac

require "$workdir" --workdir
[[ $workdir == gs://* ]] || die "--workdir must be a gs:// path that every worker can reach, got '$workdir'"
train=(.venv/bin/python -m deit_jax.main "--config=$config" "--workdir=$workdir" --distributed=on)
train+=("${passthrough[@]}")

# Starting a second trainer next to a live one would fight over the TPU chips: refuse instead.
remote="set -eu; cd $d"
remote+="; if pgrep -f '$TRAINER_PATTERN' >/dev/null; then echo 'deit_jax.main is already running' >&2; exit 1; fi"
remote+="; mkdir -p logs"
remote+="; nohup $(quote_cmd "${train[@]}") >>logs/train.log 2>&1 </dev/null &"
run "${ssh[@]}" --worker=all "--command=$remote"
