#!/usr/bin/env bash
# On one NVIDIA GPU, offline, in under 8 minutes: run the backbone tests and the gpu-marked tests in bfloat16, then
# print the figures of scripts/gpu_figures.py (Embedder training step throughput and MFU on a Qwen3-VL-2B-shaped
# model, T-CoT generation tokens/s with HF generate and, when installed, vLLM at batch 16 and 64, and 3 GRPO steps
# through TRL). Prints PASS or FAIL at the end (exit status 0 or 1).
#
#   scripts/gpu_check.sh                  # on the GPU machine, from any directory
#   scripts/gpu_check.sh -k generate      # extra arguments go to pytest
#   FIGURES=0 scripts/gpu_check.sh        # the tests alone
#
# Works from a plain checkout (embedrl need not be installed: src/ goes first on PYTHONPATH) and offline.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export EMBEDRL_TEST_DEVICE=cuda
export EMBEDRL_TEST_DTYPE=bfloat16
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

python - <<'PY' || { echo "FAIL (no CUDA device)"; exit 1; }
import torch, transformers
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name(0)}")
PY

status=0
python -m pytest tests/test_backbones.py tests/test_gpu.py -m "gpu or not slow" -q -p no:cacheprovider "$@" || status=1
if [[ "${FIGURES:-1}" != 0 ]]; then
    PYTHONUNBUFFERED=1 python scripts/gpu_figures.py || status=1
fi
if [[ $status == 0 ]]; then echo "PASS"; else echo "FAIL"; exit 1; fi
