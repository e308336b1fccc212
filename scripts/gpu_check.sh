#!/usr/bin/env bash
# Run the backbone tests and the gpu-marked tests on a CUDA device in bfloat16 and print PASS or FAIL (exit status 0 or 1).
#
#   scripts/gpu_check.sh                  # on the lent GPU machine, from any directory
#   scripts/gpu_check.sh -k generate      # extra arguments go to pytest
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

if python -m pytest tests/test_backbones.py tests/test_gpu.py -m "gpu or not slow" -q -p no:cacheprovider "$@"; then
    echo "PASS"
else
    echo "FAIL"
    exit 1
fi
