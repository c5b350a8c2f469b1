#!/usr/bin/env bash
# Keep a spot/preemptible TPU run going: recreate the slice and resume after each preemption.
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --workdir gs://BUCKET/runs/RUN [flags] [--config.KEY=VALUE ...] [-- ARGS]

Every --poll-seconds: stops (exit 0) once WORKDIR/DONE exists (the trainer writes it at the
end of the run); otherwise reads the TPU state and
  - READY / ACTIVE: checks that the trainer runs on every worker, and starts it again if not;
  - PREEMPTED / TERMINATED / STOPPED / SUSPENDED / SUSPENDING / FAILED / missing: deletes the
    slice, recreates it (tpu_create.sh), sets it up (tpu_setup.sh) and starts training
    (tpu_train.sh), which resumes from the latest checkpoint in WORKDIR;
  - anything else (CREATING, WAITING_FOR_RESOURCES, ...): waits.
Each start after the first counts as a restart; past --max-restarts it gives up (exit 1).
Run it where it can outlive your session (tmux, screen, a small always-on VM).
With --dry-run it prints the commands of one iteration that finds the slice preempted.

Flags (see tpu_create.sh, tpu_setup.sh and tpu_train.sh for their meaning):
  --name NAME               TPU (and queued resource) name. Required.
  --workdir GS_PATH         Run directory, gs://... Required.
  --zone ZONE               Zone. Default: gcloud config compute/zone.
  --project PROJECT         Project. Default: gcloud config core/project.
  --accelerator-type TYPE   Slice type. Default: v4-32.
  --version VERSION         TPU software version. Default: by generation (tpu_create.sh).
  --spot                    Spot VMs.
  --preemptible             Legacy preemptible TPUs (not with --queued).
  --queued                  Go through a queued resource (waits in the queue for capacity).
  --config FILE[:ARG]       Config. Default: configs/deit_s.py.
  --repo URL                git clone this URL on the workers instead of copying this checkout.
  --branch BRANCH           With --repo: branch or tag.
  --python VERSION          Python version of the workers' venv. Default: 3.11.
  --remote-dir DIR          Code directory on the workers. Default: ~/deit-jax.
  --max-restarts N          Give up after N restarts. Default: 20.
  --poll-seconds N          Seconds between checks. Default: 300.
  --delete-when-done        Delete the slice once WORKDIR/DONE exists.
  --dry-run                 Print one iteration's commands, one per line, without running them.
  -h, --help                Show this help.
EOF
}

name="" zone="" project="" workdir="" queued=0 max_restarts=20 poll_seconds=300
delete_when_done=0
create_args=() setup_args=() train_args=() passthrough=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name | --name=*) take_value "$@"; name=$VALUE; shift "$SHIFT" ;;
    --zone | --zone=*) take_value "$@"; zone=$VALUE; shift "$SHIFT" ;;
    --project | --project=*) take_value "$@"; project=$VALUE; shift "$SHIFT" ;;
    --workdir | --workdir=*) take_value "$@"; workdir=${VALUE%/}; shift "$SHIFT" ;;
    --accelerator-type | --accelerator-type=* | --version | --version=*)
      take_value "$@"; create_args+=("${1%%=*}=$VALUE"); shift "$SHIFT" ;;
    --spot | --preemptible) create_args+=("$1"); shift ;;
    --queued) queued=1; shift ;;
    --repo | --repo=* | --branch | --branch=* | --python | --python=*)
      take_value "$@"; setup_args+=("${1%%=*}=$VALUE"); shift "$SHIFT" ;;
    --remote-dir | --remote-dir=*)
      take_value "$@"
      setup_args+=("--remote-dir=$VALUE")
      train_args+=("--remote-dir=$VALUE")
      shift "$SHIFT" ;;
    --config | --config=*) take_value "$@"; train_args+=("--config=$VALUE"); shift "$SHIFT" ;;
    --max-restarts | --max-restarts=*) take_value "$@"; max_restarts=$VALUE; shift "$SHIFT" ;;
    --poll-seconds | --poll-seconds=*) take_value "$@"; poll_seconds=$VALUE; shift "$SHIFT" ;;
    --delete-when-done) delete_when_done=1; shift ;;
    --config.*=*) passthrough+=("$1"); shift ;;
    --config.*) die "write config overrides as $1=VALUE" ;;
    --) shift; passthrough+=("$@"); break ;;
    *) die "unknown flag $1" ;;
  esac
done
require "$name" --name
require "$workdir" --workdir
[[ $workdir == gs://* ]] || die "--workdir must be a gs:// path, got '$workdir'"
require_uint "$max_restarts" --max-restarts
require_uint "$poll_seconds" --poll-seconds
gcloud_scope "$zone" "$project"

target=(--name "$name")
[[ -z $zone ]] || target+=(--zone "$zone")
[[ -z $project ]] || target+=(--project "$project")
queued_args=()
((!queued)) || queued_args=(--queued)
train_args+=(--workdir "$workdir")
((${#passthrough[@]} == 0)) || train_args+=(-- "${passthrough[@]}")

if ((queued)); then
  describe=(gcloud compute tpus queued-resources describe "$name" "${SCOPE[@]}"
    "--format=value(state.state)")
else
  describe=(gcloud compute tpus tpu-vm describe "$name" "${SCOPE[@]}" "--format=value(state)")
fi

# step SCRIPT ARGS...: run a sibling script (under --dry-run: let it print its commands).
step() {
  local script=$1
  shift
  if ((DRY_RUN)); then
    "$LAUNCH_DIR/$script" --dry-run "$@"
  else
    log "$script $(quote_cmd "$@")"
    "$LAUNCH_DIR/$script" "$@"
  fi
}

run_is_done() {
  run gsutil -q stat "$workdir/DONE"
}

# Sets STATE to the TPU state, MISSING when it does not exist, UNKNOWN when the API call fails.
read_state() {
  local out err_file
  if ((DRY_RUN)); then
    run "${describe[@]}"
    STATE=PREEMPTED
    return
  fi
  err_file=$(mktemp)
  if out=$(run "${describe[@]}" 2>"$err_file"); then
    STATE=${out:-UNKNOWN}
  elif grep -q NOT_FOUND "$err_file"; then
    STATE=MISSING
  else
    cat "$err_file" >&2
    STATE=UNKNOWN
  fi
  rm -f "$err_file"
}

trainer_alive() {
  run gcloud compute tpus tpu-vm ssh "$name" "${SCOPE[@]}" --worker=all \
    "--command=pgrep -f '$TRAINER_PATTERN' >/dev/null"
}

# A flag error found now, not at the first preemption hours later.
"$LAUNCH_DIR/tpu_create.sh" --dry-run "${target[@]}" "${queued_args[@]}" "${create_args[@]}" >/dev/null
"$LAUNCH_DIR/tpu_setup.sh" --dry-run "${target[@]}" "${setup_args[@]}" >/dev/null
"$LAUNCH_DIR/tpu_train.sh" --dry-run "${target[@]}" "${train_args[@]}" >/dev/null

restarts=0 first=1
while true; do
  if run_is_done && ((!DRY_RUN)); then
    log "$workdir/DONE exists: the run is complete"
    ((!delete_when_done)) || step tpu_delete.sh "${target[@]}" "${queued_args[@]}"
    exit 0
  fi
  read_state
  action=""
  case $STATE in
    READY | ACTIVE)
      if trainer_alive; then
        log "$name is $STATE and training runs"
      elif run_is_done; then
        continue  # it finished between the two checks
      else
        action=train
      fi
      ;;
    PREEMPTED | TERMINATED | STOPPED | SUSPENDED | SUSPENDING | FAILED | MISSING)
      action=recreate ;;
    *) log "$name is $STATE; waiting" ;;
  esac

  if [[ -n $action ]]; then
    if ((!first)); then
      restarts=$((restarts + 1))
      if ((restarts > max_restarts)); then
        log "$name is $STATE, and the $max_restarts restarts allowed are used up; giving up"
        exit 1
      fi
      log "$name is $STATE: restart $restarts of $max_restarts ($action)"
    fi
    if [[ $action == recreate ]]; then
      if [[ $STATE != MISSING ]] && ! step tpu_delete.sh "${target[@]}" "${queued_args[@]}"; then
        log "deleting $name failed; trying again after the next poll"
      elif ! step tpu_create.sh "${target[@]}" "${queued_args[@]}" "${create_args[@]}"; then
        log "creating $name failed; trying again after the next poll"
      elif ! step tpu_setup.sh "${target[@]}" "${setup_args[@]}"; then
        log "setting up $name failed; trying again after the next poll"
      elif ! step tpu_train.sh "${target[@]}" "${train_args[@]}"; then
        log "starting training on $name failed; trying again after the next poll"
      fi
    elif ! step tpu_train.sh "${target[@]}" "${train_args[@]}"; then
      log "starting training on $name failed; trying again after the next poll"
    fi
  fi
  first=0
  run sleep "$poll_seconds"
  ((!DRY_RUN)) || exit 0
done
