"""The GPU forward pass (device cuda, and hybrid for MoE) against the CPU path on tiny random
llama GGUFs. Needs a real GPU (the simulator is too slow for whole models): make test-gpu."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("FLASHMOE_GPU_TESTS") != "1":
    pytest.skip("GPU model checks run with FLASHMOE_GPU_TESTS=1 (make test-gpu)", allow_module_level=True)


@pytest.fixture(scope="module")
def results():
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "cuda_model_checks.py")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["dense_f32.cuda", "dense_q8_0.cuda", "moe_f32.hybrid"])
def test_logits(results, case):
    assert results[f"{case}.logits"] < 1e-4
    assert results[f"{case}.greedy_same"]
