"""scripts/gpu_figures.py (the figures of scripts/gpu_check.sh) runs on the CPU at a tiny shape, so it cannot rot
between the sessions that lend a GPU."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_figures.py"


@pytest.fixture(scope="module")
def gpu_figures():
    spec = importlib.util.spec_from_file_location("gpu_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_and_generate_sections_print_figures_on_cpu(gpu_figures, capsys) -> None:
    argv = ["--device", "cpu", "--shape", "tiny", "--steps", "1", "--warmup", "0", "--train_batch", "2",
            "--new_tokens", "4"]  # fmt: skip
    assert gpu_figures.main([*argv, "--only", "train"]) == 0
    assert gpu_figures.main([*argv, "--only", "generate"]) == 0
    out = capsys.readouterr().out
    train = re.search(r"train: .* 2 pairs \((\d+) tokens\) per step, ([\d.]+) steps/s, .* MFU ([\d.]+)", out)
    assert train and int(train[1]) > 0 and float(train[2]) > 0, out
    for batch in (16, 64):
        rate = re.search(rf"HF generate, batch {batch}: ([\d,]+) tokens/s", out)
        assert rate and int(rate[1].replace(",", "")) > 0, out
    assert "SKIP vLLM" in out  # vLLM is not installed on the CPU machines


def test_a_missing_cuda_device_fails_at_once(gpu_figures, capsys, monkeypatch) -> None:
    monkeypatch.setattr(gpu_figures.torch.cuda, "is_available", lambda: False)
    assert gpu_figures.main(["--only", "train"]) == 1
    assert "FAIL no CUDA device" in capsys.readouterr().out
