#!/usr/bin/env bash
# scripts/gpu-check.sh — the GPU acceptance check: on a machine with one CUDA GPU, runs in
# under 8 minutes and prints one table (demo on CUDA in bf16 + channels_last, the demo
# from shards through DALI's mixed decoder, DeepSpeed ZeRO-2 bf16, `bench step` for
# ResNet-50 224² batch 128 bf16, `bench sparse24`, host syncs of 20 training steps, peak
# memory per check). The table is appended to BENCHMARKS.md unless --no-record is given.
#
#   bash scripts/gpu-check.sh [--no-record] [--only demo step ...] [--workdir DIR]
#
# Exit 0: every check passed; 1: a check failed (its row says why, its log is in the
# work folder); 2: no CUDA GPU here (nothing is run). PYTHON overrides the interpreter
# (default .venv/bin/python if present, else python3). Details: benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu-check: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False);" \
    "this check needs one NVIDIA GPU. Nothing was run." >&2
  exit 2
fi
exec "$PYTHON" -m benchmarks.gpu "$@"
