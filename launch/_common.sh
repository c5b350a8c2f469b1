# Shared by the launch/*.sh scripts (sourced, never run): flag parsing, --dry-run, quoting.
# shellcheck shell=bash
# The globals set here (REPO_ROOT, VALUE, SHIFT, SCOPE, ...) are read by the sourcing scripts.
# shellcheck disable=SC2034

# Empty arrays under `set -u` need bash 4.4 (macOS ships 3.2: `brew install bash`).
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "$0: needs bash >= 4.4, this is $BASH_VERSION" >&2
  exit 2
fi

PROG="$(basename "$0")"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
DRY_RUN=0

# Pinned libtpu wheels that match each jax release live here as well as on PyPI.
LIBTPU_FIND_LINKS="https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# pgrep/pkill -f pattern for a running trainer. Anchored at the start of the command line so
# that it never matches the remote shell whose own command line contains the pattern.
TRAINER_PATTERN='^[^ ]*python[0-9.]* -m deit_jax[.]main'

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

log() {
  printf '%s [%s] %s\n' "$PROG" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

# quote WORD: WORD quoted for a POSIX shell, left bare when that is safe (as Python's shlex.quote).
quote() {
  local s=$1 q="'"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$q/$q\\$q$q}"
  fi
}

# quote_cmd ARGS...: one command line that a shell splits back into exactly ARGS.
quote_cmd() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: print the command under --dry-run, otherwise echo it to stderr and run it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

# take_value "$@": the value of a `--flag VALUE` or `--flag=VALUE` argument, in VALUE; the
# number of arguments it used, in SHIFT.
take_value() {
  if [[ $1 == *=* ]]; then
    VALUE=${1#*=}
    SHIFT=1
  elif (($# >= 2)) && [[ $2 != --* ]]; then
    VALUE=$2
    SHIFT=2
  else
    die "flag ${1%%=*} needs a value"
  fi
}

# require VALUE FLAG: fail naming FLAG when VALUE is empty.
require() {
  [[ -n $1 ]] || die "missing required flag $2"
}

require_uint() {
  [[ $1 =~ ^[0-9]+$ ]] || die "$2 must be a non-negative integer, got '$1'"
}

# A remote directory is spliced into remote shell commands unquoted, so that `~` expands there.
check_remote_dir() {
  [[ $1 =~ ^[A-Za-z0-9_~/.-]+$ ]] || die "--remote-dir may only hold letters, digits and _~/.-, got '$1'"
}

# gcloud_scope ZONE PROJECT: fills SCOPE with the --zone/--project flags that were given; the
# ones left out fall back to `gcloud config` (compute/zone, core/project).
gcloud_scope() {
  SCOPE=()
  [[ -z $1 ]] || SCOPE+=("--zone=$1")
  [[ -z $2 ]] || SCOPE+=("--project=$2")
}
