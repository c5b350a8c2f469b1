#!/usr/bin/env bash
# Create a Cloud TPU VM slice, directly or through a queued resource.
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME [flags]

Creates a Cloud TPU VM (gcloud compute tpus tpu-vm create), or with --queued a queued
resource whose single node is also called NAME (gcloud compute tpus queued-resources
create), and waits until the queued resource is ACTIVE.

Flags:
  --name NAME               TPU (and queued resource) name. Required.
  --zone ZONE               Zone, e.g. us-central2-b (v4). Default: gcloud config compute/zone.
  --project PROJECT         Project. Default: gcloud config core/project.
  --accelerator-type TYPE   Slice type, e.g. v4-32, v5litepod-64, v5p-128, v6e-64. Default: v4-32.
  --version VERSION         TPU software (runtime) version. Default by generation:
                            v2/v3/v4 tpu-ubuntu2204-base, v5e (v5litepod) v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
  --spot                    Spot VMs: cheap, preemptible at any time, no runtime limit.
  --preemptible             Legacy preemptible TPUs (not with --queued).
  --queued                  Request the slice through a queued resource.
  --no-wait                 With --queued: return once the request is accepted.
  --poll-seconds N          With --queued: seconds between state checks while waiting. Default: 60.
  --dry-run                 Print the commands, one per line, without running them.
  -h, --help                Show this help.
EOF
}

# default_version ACCELERATOR_TYPE: the TPU software version Cloud TPU recommends for JAX.
default_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default --version for --accelerator-type=$1; pass --version" ;;
  esac
}

name="" zone="" project="" accelerator_type="v4-32" version="" tier="" queued=0 wait=1
poll_seconds=60
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name | --name=*) take_value "$@"; name=$VALUE; shift "$SHIFT" ;;
    --zone | --zone=*) take_value "$@"; zone=$VALUE; shift "$SHIFT" ;;
    --project | --project=*) take_value "$@"; project=$VALUE; shift "$SHIFT" ;;
    --accelerator-type | --accelerator-type=*)
      take_value "$@"; accelerator_type=$VALUE; shift "$SHIFT" ;;
    --version | --version=*) take_value "$@"; version=$VALUE; shift "$SHIFT" ;;
    --spot | --preemptible)
      [[ -z $tier || $tier == "$1" ]] || die "--spot and --preemptible exclude each other"
      tier=$1; shift ;;
    --queued) queued=1; shift ;;
    --no-wait) wait=0; shift ;;
    --poll-seconds | --poll-seconds=*) take_value "$@"; poll_seconds=$VALUE; shift "$SHIFT" ;;
    *) die "unknown flag $1" ;;
  esac
done
require "$name" --name
require_uint "$poll_seconds" --poll-seconds
[[ -n $version ]] || version=$(default_version "$accelerator_type")
gcloud_scope "$zone" "$project"

if ((!queued)); then
  cmd=(gcloud compute tpus tpu-vm create "$name" "${SCOPE[@]}"
    "--accelerator-type=$accelerator_type" "--version=$version")
  [[ -z $tier ]] || cmd+=("$tier")
  run "${cmd[@]}"
  exit 0
fi

[[ $tier != --preemptible ]] || die "--queued takes --spot, not --preemptible"
cmd=(gcloud compute tpus queued-resources create "$name" "${SCOPE[@]}" "--node-id=$name"
  "--accelerator-type=$accelerator_type" "--runtime-version=$version")
[[ -z $tier ]] || cmd+=("$tier")
run "${cmd[@]}"
((wait)) || exit 0

# The node only exists, and can only be set up, once the request is ACTIVE.
describe=(gcloud compute tpus queued-resources describe "$name" "${SCOPE[@]}"
  "--format=value(state.state)")
if ((DRY_RUN)); then
  run "${describe[@]}"
  exit 0
fi
while true; do
  state=$("${describe[@]}") || state=""  # a failed poll is retried
  case $state in
    ACTIVE) log "queued resource $name is ACTIVE"; exit 0 ;;
    FAILED | SUSPENDED | SUSPENDING) log "queued resource $name is $state"; exit 1 ;;
    *) log "queued resource $name is ${state:-in an unknown state}; waiting ${poll_seconds}s" ;;
  esac
  sleep "$poll_seconds"
done
