#!/usr/bin/env bash
# The GPU path on a machine with a CUDA GPU and no network: the smoke pipeline with every stage on the
# GPU (Ray Train workers of Stages 1-3, feature extractors, policy server, GRPO learner, world-model
# scorer; transformers backend, since no vLLM wheel fits), then per stage its device, peak GPU
# memory and time. Uses .venv when it exists (scripts/setup.sh), else the python3 on PATH with the
# project importable (a GPU machine brings its own CUDA torch). Without a GPU it runs on the CPU and
# says so. Usage: scripts/gpu_check.sh [RUN_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore RAY_DEDUP_LOGS=1
exec "$PY" scripts/gpu_check.py "$@"
