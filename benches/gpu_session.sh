#!/usr/bin/env bash
# The GPU check in one prepared run: build, GPU tests, compute-sanitizer, the speed race.
#
#   bash benches/gpu_session.sh OUT            # the essential pass: at most 480 s of step limits
#   bash benches/gpu_session.sh OUT extra      # the optional second pass: at most 300 s
#   bash benches/gpu_session.sh --plan [extra] # print the steps, their limits and the total
#   ERM_GPU_STEPS=tests,token_stats bash benches/gpu_session.sh OUT   # only these steps (a rerun
#                                              # on the same machine: the build is already there)
#
# Essential pass: build the CUDA extension for this GPU's architecture only (MAX_JOBS=16; if that
# fails, erm is installed without it and the cuda rows are missing); the GPU tests of
# token_stats, endogenous rewards, linear_token_stats and dispatch (real-vocabulary parity
# included, --maxfail); compute-sanitizer memcheck and racecheck on one small shape per kernel
# (benches/sanitize_cases.py); the token_stats race (N=8192, V=151936, bf16, forward and
# forward+backward: erm cuda/triton, eager, torch.compile, Liger, TRL's Triton kernel, quack),
# the fused LM head race (N=8192, D=3584, V=151936, bf16: erm, eager, torch.compile, Liger fused
# linear CE, cut-cross-entropy) with their floors measured in the same process, and one
# end-to-end EndoRM scoring row (random Qwen2.5-0.5B-shape model, 16k tokens).
# Extra pass (after the essential one, on the same machine: it reuses the build): token_stats
# at V = 32000, 128256, 262144 and in float32, the fused head in float32, the RL-step bench.
#
# Every step runs under its own time limit (`timeout`), so one slow step cannot eat the others;
# each step's log and exit status go to the tarball. Autotuning is bounded (kernels/autotune.py):
# ERM_AUTOTUNE=pinned for the tests and the sanitizer (no search), quick for the benches (a
# shortlist, about 20 s per shape at most; 10 s for the fused head, which has three kernels).
# Peers come from wheels in .whl/ (benches/RESULTS.md says how to prepare them), installed into
# /tmp/site. What comes back is at most 8 files in OUT: gpu_session_<pass>.tgz (the logs, the
# PNGs and JSONs too) and the JSONs token_stats-<gpu>.json, linear-<gpu>.json, score-<gpu>.json
# (extra: token_stats-<gpu>-<variant>.json, linear-<gpu>-fp32.json, rl_step-<gpu>.json) and the
# essential pass's two PNGs.
set -uo pipefail

usage() {
  echo "usage: bash benches/gpu_session.sh OUT [essential|extra]   or   bash benches/gpu_session.sh --plan [essential|extra]" >&2
  exit 2
}
PLAN=0
if [ "${1:-}" = --plan ]; then
  PLAN=1; PASS=${2:-essential}; OUT=OUT; LOGS=LOGS; GPU=GPU; ARCH=ARCH
  SAN=compute-sanitizer
elif [ $# -ge 1 ] && [[ "$1" != -* ]]; then
  OUT=$1; PASS=${2:-essential}
else
  usage
fi
case "$PASS" in essential|extra) ;; *) usage ;; esac
MAX_S=480; [ "$PASS" = extra ] && MAX_S=300
total=0

ONLY=${ERM_GPU_STEPS:-}
step() {  # step NAME LIMIT CMD...: run CMD under a LIMIT-second timeout, log to $LOGS/NAME.log
  local name=$1 limit=$2 rc; shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
  total=$((total + limit))
  if [ $PLAN = 1 ]; then
    printf '%s\t%s\t' "$name" "$limit"; printf '%q ' "$@"; printf '\n'
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=3 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 30 "$LOGS/$name.log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "!! $name: time limit reached"; fi
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$rc" "$((SECONDS - t0))" >> "$LOGS/steps.tsv"
}

if [ $PLAN = 0 ]; then
  mkdir -p "$OUT" || exit 2
  LOGS=${TMPDIR:-/tmp}/erm_gpu_session_$PASS
  rm -rf "$LOGS"; mkdir -p "$LOGS"
  trap 'cp "$OUT"/*.png "$OUT"/*.json "$LOGS"/ 2>/dev/null; tar czf "$OUT/gpu_session_$PASS.tgz" -C "$LOGS" . && echo "results in $OUT: $(ls "$OUT" | tr "\n" " ")"' EXIT
  export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ERM_AUTOTUNE=quick
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
        | grep -o '[a-z][0-9][0-9][0-9]*' | head -1)
  GPU=${GPU:-gpu}
  ARCH=${ERM_GPU_ARCH:-$(python3 -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')" 2>/dev/null)}
  ARCH=${ARCH:-9.0}
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
        /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
  SAN=${SAN:-compute-sanitizer}
  echo "pass $PASS on $GPU (sm $ARCH), out $OUT, logs $LOGS"
fi

PEERS='shopt -s nullglob; w=(.whl/*.whl); if [ ${#w[@]} -eq 0 ]; then echo "no wheels in .whl/: peer rows missing"; exit 0; fi; '\
'python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${w[@]}"'
BUILD='timeout 78 env ERM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$0" MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . && exit 0; '\
'echo "!! the CUDA build failed or timed out: installing erm without erm._C (no cuda rows)"; '\
'ERM_BUILD_CUDA=0 python3 -m pip install -q --no-build-isolation --no-deps -e .; exit 3'
VERSIONS='import erm, torch, triton; print(erm.backends(), "torch", torch.__version__, "triton", triton.__version__)'
# -v: a step stopped by its limit still shows which tests passed and which one was running
PYTEST=(env ERM_AUTOTUNE=pinned python3 -m pytest -v -rfE --maxfail=20 -p no:cacheprovider --durations=10)
SAN_ENV=(env ERM_AUTOTUNE=pinned PYTORCH_NO_CUDA_MEMORY_CACHING=1)
SAN_ARGS=(--print-limit 20 --error-exitcode 9 python3 benches/sanitize_cases.py)

if [ "$PASS" = essential ]; then
  step gpu 5 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  step peers 10 bash -c "$PEERS"
  step build 90 bash -c "$BUILD" "$ARCH"
  step versions 10 python3 -c "$VERSIONS"
  step tests 45 "${PYTEST[@]}" tests/test_token_stats.py tests/test_endogenous.py \
    tests/test_dispatch.py tests/test_cuda_ext.py -k "not builds_and_registers and not compile_for_sm90"
  step tests_linear 40 "${PYTEST[@]}" tests/test_linear_token_stats.py
  step memcheck 40 "${SAN_ENV[@]}" "$SAN" --tool memcheck "${SAN_ARGS[@]}"
  step racecheck 35 "${SAN_ENV[@]}" "$SAN" --tool racecheck "${SAN_ARGS[@]}"
  step token_stats 80 python3 benches/bench_token_stats.py --reps 30 \
    --json "$OUT/token_stats-$GPU.json" --plot "$OUT/token_stats-$GPU.png"
  step linear 76 env ERM_AUTOTUNE_BUDGET_S=10 python3 benches/bench_linear_token_stats.py \
    --reps 10 --warmup 3 --json "$OUT/linear-$GPU.json" --plot "$OUT/linear-$GPU.png"
  step score 40 env ERM_AUTOTUNE_BUDGET_S=8 python3 benches/bench_score.py --reps 5 \
    --json "$OUT/score-$GPU.json"
else
  step peers 5 bash -c "$PEERS"
  for v in 32000 128256 262144; do
    step "token_stats_v$v" $((35 + v / 20000)) python3 benches/bench_token_stats.py --v "$v" \
      --reps 20 --json "$OUT/token_stats-$GPU-v$v.json" --plot "$LOGS/token_stats-$GPU-v$v.png"
  done
  step token_stats_fp32 50 python3 benches/bench_token_stats.py --dtype float32 --reps 20 \
    --json "$OUT/token_stats-$GPU-fp32.json" --plot "$LOGS/token_stats-$GPU-fp32.png"
  step linear_fp32 45 env ERM_AUTOTUNE_BUDGET_S=8 python3 benches/bench_linear_token_stats.py \
    --dtype float32 --n 2048 --reps 5 --warmup 2 --json "$OUT/linear-$GPU-fp32.json" \
    --plot "$LOGS/linear-$GPU-fp32.png"
  step rl_step 60 python3 benches/bench_rl_step.py --json "$OUT/rl_step-$GPU.json"
fi

if [ $PLAN = 1 ]; then
  printf 'total\t%s\t(limit %s s)\n' "$total" "$MAX_S"
  [ "$total" -le "$MAX_S" ] || { echo "the $PASS pass's limits exceed $MAX_S s" >&2; exit 1; }
fi
