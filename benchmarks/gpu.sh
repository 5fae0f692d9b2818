#!/usr/bin/env bash
# Every GPU check of the suite on one lent GPU, within 10 minutes: the m4 bench at the small and the published shape
# (bf16, MFU, peak memory, tokens/s), the dynamics gpu16gb shape, and a smoke run of every experiment on its GPU
# profile; results in benchmarks/results/gpu-*.json, each naming the device (benchmarks/gpu.py says more).
#   benchmarks/gpu.sh          on the GPU machine, from anywhere
#   benchmarks/gpu.sh --dry    on a CPU: check that every step would start (imports, configs, tiny models)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m benchmarks.gpu "$@"
