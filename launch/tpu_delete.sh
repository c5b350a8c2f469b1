#!/usr/bin/env bash
# Delete a Cloud TPU VM, or a queued resource together with its node.
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME [flags]

Deletes the TPU VM NAME (gcloud compute tpus tpu-vm delete), or with --queued the queued
resource NAME and its node (gcloud compute tpus queued-resources delete --force), without
asking for confirmation. The run's checkpoints in the gs:// workdir are not touched.

Flags:
  --name NAME          TPU (or queued resource) name. Required.
  --zone ZONE          Zone. Default: gcloud config compute/zone.
  --project PROJECT    Project. Default: gcloud config core/project.
  --queued             NAME is a queued resource (created with tpu_create.sh --queued).
  --dry-run            Print the commands, one per line, without running them.
  -h, --help           Show this help.
EOF
}

name="" zone="" project="" queued=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name | --name=*) take_value "$@"; name=$VALUE; shift "$SHIFT" ;;
    --zone | --zone=*) take_value "$@"; zone=$VALUE; shift "$SHIFT" ;;
    --project | --project=*) take_value "$@"; project=$VALUE; shift "$SHIFT" ;;
    --queued) queued=1; shift ;;
    *) die "unknown flag $1" ;;
  esac
done
require "$name" --name
gcloud_scope "$zone" "$project"

if ((queued)); then
  run gcloud compute tpus queued-resources delete "$name" "${SCOPE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$name" "${SCOPE[@]}" --quiet
fi
