#!/usr/bin/env bash
# The throughput grid: deit-jax (deit_jax.benchmark) against timm in PyTorch
# (benchmarks/timm_reference.py, eager and torch.compile), DeiT-Ti/S/B distilled, with and
# without a teacher, every configuration run once per round and rounds interleaved so that a
# drifting machine affects every framework alike. Writes OUT/results.jsonl, OUT/table.md and
# one log per run under OUT/logs.
#
#   benchmarks/run_all.sh --device=cpu                      # DeiT-Ti, batch 32, a few minutes
#   benchmarks/run_all.sh --device=gpu --peak_tflops=989    # DeiT-Ti/S/B, bf16, regnety_160
#
# Flags (defaults depend on --device):
#   --device=cpu|gpu   --models="ti s b"   --teachers="none regnety_160"   --batch_sizes="256"
#   --steps=20  --warmup=3  --rounds=1  --dtype=bfloat16  --peak_tflops=0  --mode=train
#   --frameworks="jax torch_eager torch_compile"  --timeout=1800  --out=DIR
#   --jax_args="--attention_impl=cudnn"  (extra flags for deit_jax.benchmark only)
# Environment: PYTHON (default: python), extra XLA_FLAGS are passed through.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DEVICE=cpu
for arg in "$@"; do [[ "$arg" == --device=* ]] && DEVICE="${arg#--device=}"; done
if [[ "$DEVICE" == gpu ]]; then
  MODELS="ti s b"; TEACHERS="none regnety_160"; BATCH_SIZES="256"; STEPS=20; WARMUP=3
  DTYPE=bfloat16
else
  MODELS="ti"; TEACHERS="none regnety_002"; BATCH_SIZES="32"; STEPS=3; WARMUP=1
  DTYPE=float32
fi
JAX_ARGS=""; ROUNDS=1; PEAK=0; MODE=train; FRAMEWORKS="jax torch_eager torch_compile"; TIMEOUT=1800
OUT="${TMPDIR:-/tmp}/deit_jax_bench/$DEVICE-$(date +%Y%m%d-%H%M%S)"
for arg in "$@"; do
  case "$arg" in
    --device=*) ;;
    --models=*) MODELS="${arg#*=}" ;;
    --teachers=*) TEACHERS="${arg#*=}" ;;
    --batch_sizes=*) BATCH_SIZES="${arg#*=}" ;;
    --steps=*) STEPS="${arg#*=}" ;;
    --warmup=*) WARMUP="${arg#*=}" ;;
    --rounds=*) ROUNDS="${arg#*=}" ;;
    --dtype=*) DTYPE="${arg#*=}" ;;
    --peak_tflops=*) PEAK="${arg#*=}" ;;
    --mode=*) MODE="${arg#*=}" ;;
    --frameworks=*) FRAMEWORKS="${arg#*=}" ;;
    --timeout=*) TIMEOUT="${arg#*=}" ;;
    --out=*) OUT="${arg#*=}" ;;
    --jax_args=*) JAX_ARGS="${arg#*=}" ;;
    *) echo "unknown flag $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done

if [[ "$DEVICE" == cpu ]]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
fi
declare -A NAMES=([ti]=deit_tiny_distilled_patch16_224 [s]=deit_small_distilled_patch16_224
                  [b]=deit_base_distilled_patch16_224)
mkdir -p "$OUT/logs"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc) cpus"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || true)"
  echo "args: $*"
} > "$OUT/env.txt"

run() {  # run LOGNAME COMMAND...: appends the JSON line, keeps going on failure
  local log="$OUT/logs/$1.log"; shift
  echo "+ $*" | tee "$log" >&2
  if timeout "$TIMEOUT" "$@" >> "$log" 2>&1; then
    grep '^{' "$log" | tail -1 >> "$RESULTS"
    grep '^{' "$log" | tail -1 | cut -c1-200 >&2
  else
    echo "  FAILED (exit $?), see $log" >&2
  fi
}

cd "$ROOT"
for round in $(seq 1 "$ROUNDS"); do
  for size in $MODELS; do
    model="${NAMES[$size]:-$size}"
    for teacher in $TEACHERS; do
      targ=""; [[ "$teacher" != none ]] && targ="--teacher=$teacher"
      for bs in $BATCH_SIZES; do
        common=(--model="$model" --batch_size="$bs" --mode="$MODE" --dtype="$DTYPE"
                --steps="$STEPS" --warmup="$WARMUP" --peak_tflops="$PEAK" $targ)
        tag="$size-$teacher-$bs-r$round"
        for fw in $FRAMEWORKS; do
          case "$fw" in
            jax) PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" run "$tag-jax" \
                   "$PYTHON" -m deit_jax.benchmark "${common[@]}" $JAX_ARGS ;;
            torch_eager) run "$tag-eager" \
                   "$PYTHON" benchmarks/timm_reference.py "${common[@]}" ;;
            torch_compile) run "$tag-compile" \
                   "$PYTHON" benchmarks/timm_reference.py "${common[@]}" --compile --no_flops ;;
            *) echo "unknown framework $fw" >&2; exit 2 ;;
          esac
        done
      done
    done
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || true)" >> "$OUT/env.txt"
"$PYTHON" benchmarks/make_table.py "$RESULTS" --env="$OUT/env.txt" | tee "$OUT/table.md"
echo "wrote $OUT/table.md" >&2
