#!/usr/bin/env bash
# Put the code and a Python environment with jax[tpu] on every worker of a TPU VM slice.
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME [flags]

On every worker of the TPU VM NAME: puts the code in --remote-dir (a copy of this checkout,
or with --repo a git clone), creates the venv --remote-dir/.venv with Python --python
(JAX needs >= 3.11; the TPU images ship 3.10, so uv fetches a standalone build), and
installs requirements.txt together with jax[tpu], resolved in one step so that jax stays
within the versions requirements.txt allows. Safe to run again: it updates in place.

Flags:
  --name NAME          TPU name. Required.
  --zone ZONE          Zone. Default: gcloud config compute/zone.
  --project PROJECT    Project. Default: gcloud config core/project.
  --repo URL           git clone URL on the workers instead of copying this checkout
                       (the copy takes the working tree as it is, minus .git, .venv, workdirs).
  --branch BRANCH      With --repo: branch or tag to check out. Default: the remote's default.
  --remote-dir DIR     Code directory on the workers. Default: ~/deit-jax.
  --python VERSION     Python version of the venv. Default: 3.11.
  --dry-run            Print the commands, one per line, without running them.
  -h, --help           Show this help.
EOF
}

# The tilde is for the workers' shells to expand.
# shellcheck disable=SC2088
name="" zone="" project="" repo="" branch="" remote_dir="~/deit-jax" python_version="3.11"
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name | --name=*) take_value "$@"; name=$VALUE; shift "$SHIFT" ;;
    --zone | --zone=*) take_value "$@"; zone=$VALUE; shift "$SHIFT" ;;
    --project | --project=*) take_value "$@"; project=$VALUE; shift "$SHIFT" ;;
    --repo | --repo=*) take_value "$@"; repo=$VALUE; shift "$SHIFT" ;;
    --branch | --branch=*) take_value "$@"; branch=$VALUE; shift "$SHIFT" ;;
    --remote-dir | --remote-dir=*) take_value "$@"; remote_dir=$VALUE; shift "$SHIFT" ;;
    --python | --python=*) take_value "$@"; python_version=$VALUE; shift "$SHIFT" ;;
    *) die "unknown flag $1" ;;
  esac
done
require "$name" --name
check_remote_dir "$remote_dir"
[[ -z $branch || -n $repo ]] || die "--branch needs --repo"
gcloud_scope "$zone" "$project"

d=$remote_dir
if [[ -z $repo ]]; then
  archive="${TMPDIR:-/tmp}/deit-jax-$name.tar.gz"
  run tar -czf "$archive" --exclude=.git --exclude=.venv --exclude=workdirs \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache -C "$REPO_ROOT" .
  run gcloud compute tpus tpu-vm scp "$archive" "$name:deit-jax-src.tar.gz" "${SCOPE[@]}" \
    --worker=all
  get_code="mkdir -p $d && tar -xzf ~/deit-jax-src.tar.gz -C $d && rm ~/deit-jax-src.tar.gz"
elif [[ -z $branch ]]; then
  get_code="if [ -d $d/.git ]; then git -C $d pull --ff-only --quiet;"
  get_code+=" else git clone --quiet $(quote "$repo") $d; fi"
else
  b=$(quote "$branch")
  get_code="if [ -d $d/.git ]; then git -C $d fetch --quiet origin $b"
  get_code+=" && git -C $d checkout --quiet --force FETCH_HEAD;"
  get_code+=" else git clone --quiet --branch $b $(quote "$repo") $d; fi"
fi

# uv installs itself with the image's pip, then provides the Python JAX needs.
install="python3 -m pip install --user --quiet --upgrade uv"
install+=" && ~/.local/bin/uv venv --quiet --allow-existing --python $(quote "$python_version") $d/.venv"
install+=" && ~/.local/bin/uv pip install --quiet --python $d/.venv/bin/python"
install+=" -r $d/requirements.txt 'jax[tpu]' -f $LIBTPU_FIND_LINKS"

run gcloud compute tpus tpu-vm ssh "$name" "${SCOPE[@]}" --worker=all \
  "--command=set -eu; $get_code; $install"
