"""CUDA kernels against gguf.quants (block formats) and numpy formulas (layer operations).

Without a GPU the kernels run in numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) on small shapes;
the simulator must be switched on before numba.cuda is first imported, so the checks run in a
child process (tests/cuda_checks.py) and each check here reads its figure. With
FLASHMOE_GPU_TESTS=1 (make test-gpu) they run on the real GPU with larger shapes.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (the cuda extra)")

from conftest import ON_GPU, cuda_checks  # noqa: E402

FORMATS = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
           "BF16", "IQ4_NL", "IQ4_XS", "MXFP4", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S"]
OPS = ["rmsnorm", "rope.neox=False", "rope.neox=True", "rope_store.neox=False", "rope_store.neox=True",
       "attention", "attention.long", "silu_mul", "add_inplace", "softmax_topk.weights"]


@pytest.fixture(scope="module")
def results(request):
    # the child started when collection selected this module (conftest.py): it ran beside the
    # tests before this one
    rc, out, err = cuda_checks(request.config)
    assert rc == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fn", ["matvec", "matmul", "dequantize_rows"])
def test_format(results, fmt, fn):
    # float32 accumulation over C <= 4096 products against a float64 oracle
    assert results[f"{fmt}.{fn}"] < 2e-5


@pytest.mark.parametrize("op", OPS)
def test_op(results, op):
    assert results[op] < 2e-5


INT8 = ["Q4_K", "Q5_K", "Q2_K", "Q3_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "MXFP4"]


@pytest.mark.parametrize("fmt", INT8)
def test_int8_kernels(results, fmt):
    # the dp4a kernels: exact integer block sums, so float32 rounding only (x rounded as on the CPU)
    assert results[f"int8.{fmt}.quantize"] == 0.0  # the same int8 activations as the CPU path
    assert results[f"int8.{fmt}.matvec"] < 2e-5
    assert results[f"int8.{fmt}.accumulate"] < 2e-5  # out += product; a token's weighted expert sum
    # and exactly: the float64 sums rounded once, as the CPU's kernels give them (test_exact.py)
    assert results[f"int8.{fmt}.inexact"] == 0
    assert results[f"int8.{fmt}.accumulate_inexact"] == 0
    # Q8_0: read as block pairs (rows of an even number of blocks) and as blocks, both checked
    assert results[f"int8.{fmt}.views"] == (2 if fmt == "Q8_0" else 1)


@pytest.mark.skipif(ON_GPU, reason="the GPU run checks every variant of every format at full size")
@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0"])
def test_int8_variants_long_rows(results, fmt):
    # several rows per warp and unrolled steps, on rows with an unrolled step and a remainder
    assert results[f"int8.long.{fmt}.matvec"] < 2e-5


def test_attention_int8(results):
    # attention's output and its int8 form (for the next product) in one launch
    assert results["attention_int8.value"] < 2e-5
    assert results["attention_int8.int8"] == 0.0


@pytest.mark.parametrize("qb", [32, 256])
def test_quantize_silu(results, qb):
    # silu(g) * u computed and rounded to int8 in one launch: the CPU's values (exp may differ in
    # its last bit between the devices, so an int8 value may sit one step off at a rounding tie)
    assert results[f"int8.quantize_silu.{qb}.value"] < 1e-6
    assert results[f"int8.quantize_silu.{qb}.int8_diff"] <= 1


@pytest.mark.parametrize("qb", [32, 256])
def test_rmsnorm_int8(results, qb):
    # RMSNorm and its int8 form in one launch: the CPU quantizer's int8 values of its output
    assert results[f"int8.rmsnorm.{qb}.value"] < 2e-5
    assert results[f"int8.rmsnorm.{qb}.int8"] == 0.0


def test_few_rows_product(results):
    assert results["F32.matvec_few_rows"] < 2e-5


def test_moe_ops(results):
    assert results["route.ids"] == 0.0
    assert results["route.weights"] < 2e-5
    assert results["router_route.ids"] == 0.0
    assert results["router_route.weights"] < 1e-4  # (float32 logits summed in another order)
    assert results["moe_combine"] < 2e-5
    assert results["sigmoid_gate"] < 2e-5
    assert results["greedy_step.wrong"] == 0.0  # the device's argmax: numpy's, ties and NaN included


def test_topk_ids(results):
    assert results["softmax_topk.ids"] == 0.0
