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


DENSE = ["dense_f32.cuda", "dense_q8_0.cuda"]
MOE = [f"{m}.{mode}" for m in ("moe_f32", "moe_q4_k", "moe_shexp_q4_k")
       for mode in ("cuda", "hybrid", "hybrid_cache", "hybrid_cache_staged", "unified")] + [
    "moe_mixed.cuda", "moe_mixed.hybrid"]


@pytest.mark.parametrize("case", DENSE + MOE)
def test_logits(results, case):
    # every device mode against the CPU path: float kernels on both for f32 weights, int8
    # activations on both (rounded alike) for the quantized ones
    assert results[f"{case}.logits"] < 1e-3
    assert results[f"{case}.greedy_same"]
    # both devices compute the same float32 numbers (docs/architecture.md, Numerics): the logits
    # are the CPU's bit for bit (but at a float64 rounding boundary, ~1 value in 10^7)
    assert results[f"{case}.logits_differ"] == 0
    # the greedy steps chained on the device give the tokens of forward and an argmax
    assert results[f"{case}.device_greedy_same0"] and results[f"{case}.device_greedy_same1"]


@pytest.mark.parametrize("m", ["moe_f32", "moe_q4_k"])
def test_decode_graph_and_cache(results, m):
    assert results[f"{m}.cuda.graph"] and results[f"{m}.unified.graph"]  # the decode steps were replayed
    assert not results[f"{m}.hybrid.graph"]
    # hybrid: the launches between the host's routing steps recorded as graphs and replayed
    assert results[f"{m}.hybrid.hybrid_graphs"] and results[f"{m}.hybrid_cache.hybrid_graphs"]
    assert not results[f"{m}.cuda.hybrid_graphs"]
    assert results[f"{m}.cuda.device_greedy_graph"] and results[f"{m}.unified.device_greedy_graph"]
    for mode in ("hybrid_cache", "hybrid_cache_staged"):
        assert results[f"{m}.{mode}.cache_hits"] > 0 and results[f"{m}.{mode}.cache_misses"] > 0
    # misses straight from the registered file, or through the staging buffers when told so
    assert results[f"{m}.hybrid_cache.cache_direct"] and not results[f"{m}.hybrid_cache_staged.cache_direct"]


SMOLLM2_MOE = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct-32x.Q4_K.gguf"
SMOLLM2_MODES = ["cuda", "hybrid", "hybrid_cache", "unified"]
needs_smollm2 = pytest.mark.skipif(not SMOLLM2_MOE.exists(), reason="make models builds the upcycled SmolLM2 MoE")


@needs_smollm2
@pytest.mark.parametrize("mode", SMOLLM2_MODES)
def test_smollm2_moe_greedy_float(smollm2_float, mode):
    # Float kernels on both devices (FLASHMOE_FLOAT_KERNELS=1): the CPU path perturbed by 1e-7
    # moves its logits by ~2e-6 here, so every mode must give the CPU's 48 greedy tokens exactly.
    r = {k.split(".", 2)[2]: v for k, v in smollm2_float.items() if k.startswith(f"smollm2_moe_float.{mode}.")}
    assert smollm2_float["smollm2_moe_float.cpu_tokens"] == 48
    assert r["greedy_same"], r
    assert r["forced_max_logit_err"] < 1e-3, r


@needs_smollm2
@pytest.mark.parametrize("mode", SMOLLM2_MODES)
def test_smollm2_moe_greedy(smollm2, mode):
    # The default kernels round activations to int8 on both devices (as llama.cpp does), and
    # with int8 this model amplifies float32-rounding-sized differences: the CPU path itself,
    # its MoE input perturbed by 1e-7 relative, parts from its own greedy tokens within 0-30
    # tokens on each of ten prompts (bench/sensitivity.py). Both devices compute the same float32
    # numbers (float64 sums rounded once: docs/architecture.md, Numerics), so every mode gives
    # the CPU's 48 tokens, and fed the CPU's tokens, its logits bit for bit at every step.
    r = {k.split(".", 2)[2]: v for k, v in smollm2.items() if k.startswith(f"smollm2_moe.{mode}.")}
    assert smollm2["smollm2_moe.cpu_tokens"] == 48
    assert r["greedy_same"], r
    assert r["forced_argmax_agree"] == 1.0, r
    assert r["forced_logits_differ"] == 0, r


def _run_smollm2(env=None):
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "cuda_model_checks.py"), "--no-tiny",
                        "--smollm2-moe", str(SMOLLM2_MOE)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr[-4000:]
    print(p.stdout.strip().splitlines()[-1])  # the figures (pytest -s shows them)
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smollm2():
    return _run_smollm2()


@pytest.fixture(scope="module")
def smollm2_float():
    return _run_smollm2({"FLASHMOE_FLOAT_KERNELS": "1"})
