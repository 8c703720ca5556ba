#!/usr/bin/env bash
# Everything a GPU session needs to check and measure, in one device call (about 10 minutes):
# build the CUDA extension for this GPU, run the GPU tests (parity of cuda/triton vs float64),
# compute-sanitizer on the CUDA tests if present, then the three benches, JSON + logs to $OUT.
#
#   run(command="bash benches/gpu_session.sh", carry=[".whl"])     # from the device tool
#
# Optional peers (liger-kernel, cut-cross-entropy) travel as wheels in .whl/ (see the device
# tool's README); they are installed into /tmp/site when present.
set -uo pipefail
OUT=${OUT:-/tmp/erm-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
arch=$(python3 -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
( time ERM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16 \
    python3 -m pip install -q --no-build-isolation --no-deps -e . ) 2>&1 | tail -5 | tee "$OUT/build.log"
python3 -c "import erm; print(erm.backends())" | tee -a "$OUT/build.log"
python3 -m pytest -q -x tests/test_cuda_ext.py tests/test_token_stats.py tests/test_endogenous.py \
  tests/test_linear_token_stats.py 2>&1 | tee "$OUT/tests.log" | tail -15
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --print-limit 20 python3 -m pytest -q -x tests/test_cuda_ext.py \
      -k "matches_float64 or strided_view" 2>&1 | tail -8 | tee "$OUT/sanitizer_$tool.log"
  done
fi
python3 benches/bench_token_stats.py --json "$OUT/token_stats.json" 2>&1 | tee "$OUT/bench_token_stats.md" | tail -12
python3 benches/bench_linear_token_stats.py --json "$OUT/linear.json" 2>&1 | tee "$OUT/bench_linear.md" | tail -12
python3 benches/bench_rl_step.py 2>&1 | tee "$OUT/bench_rl.md" | tail -8
