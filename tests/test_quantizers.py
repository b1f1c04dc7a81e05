"""Block quantizers (kernels/cpu/*_quant.py through flashmoe_gguf.quants) against llama.cpp.

Oracles: ``gguf.quants.dequantize`` decodes our bytes (the format is exact if it decodes to what
we meant, and our error is measured on its output); ``tests/data/kquants/rmse.txt`` holds
llama.cpp's RMSE for the same tensors of ``source.gguf`` (``llama-quantize --pure``, no importance
matrix). Our RMSE must be at most TOLERANCE x llama.cpp's for every (tensor, type) listed there.
Where llama-cpp-python is installed, llama.cpp's quantizer itself (ggml_quantize_chunk) is also
run with an importance vector, and our importance-weighted error must not exceed its.
Run with ``-s`` to see the ratios.
"""
from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from flashmoe_gguf import quants

DATA = Path(__file__).parent / "data" / "kquants"
TOLERANCE = 1.02


def _llama_rmse() -> dict[tuple[str, str], float]:
    """(type, tensor) -> llama.cpp's RMSE, from lines 'TYPE name:TYPE:rmse=x name:TYPE:rmse=x ...'."""
    table = {}
    for line in (DATA / "rmse.txt").read_text().splitlines():
        for item in line.split()[1:]:
            name, qtype, rmse = item.split(":")
            table[(qtype, name)] = float(rmse.removeprefix("rmse="))
    return table


LLAMA_RMSE = _llama_rmse()
TYPES = sorted({t for t, _ in LLAMA_RMSE})
_ratios: dict[tuple[str, str], float] = {}


@lru_cache(maxsize=None)
def _source() -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(DATA / "source.gguf")
    return {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}


@lru_cache(maxsize=None)
def _quantized(qtype: str, name: str) -> np.ndarray:
    return quants.quantize(_source()[name], qtype)


def _decode(data: np.ndarray, qtype: str, shape) -> np.ndarray:
    return gguf.quants.dequantize(data, GGMLQuantizationType[qtype]).reshape(shape)


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if _ratios:
        print("\nRMSE / llama.cpp's RMSE:")
        for (qtype, name), r in sorted(_ratios.items()):
            print(f"  {qtype:7s} {name:24s} {r:.4f}")


@pytest.mark.parametrize("qtype,name", sorted(LLAMA_RMSE))
def test_rmse_at_most_llama_cpp(qtype, name):
    x = _source()[name]
    q = _quantized(qtype, name)
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    assert q.dtype == np.uint8 and q.shape == (x.shape[0], x.shape[1] // block_size * type_size)
    y = _decode(q, qtype, x.shape)
    assert np.isfinite(y).all()
    ratio = _rmse(y, x) / LLAMA_RMSE[(qtype, name)]
    _ratios[(qtype, name)] = ratio
    assert ratio <= TOLERANCE, f"{qtype} {name}: RMSE {ratio:.4f}x llama.cpp's"


def _kernel_or_skip(qtype: str):
    name = qtype.lower()
    if importlib.util.find_spec(f"flashmoe_gguf.kernels.cpu.{name}") is None:
        pytest.skip(f"no kernel module {name} yet")


@pytest.mark.parametrize("qtype", TYPES)
def test_our_dequantize_matches_gguf(qtype):
    """Our bytes decode the same through the project's kernels as through gguf.quants."""
    _kernel_or_skip(qtype)
    name = "blk.0.attn_q.weight"
    x = _source()[name]
    q = _quantized(qtype, name)
    ref = _decode(q, qtype, x.shape)
    ours = quants.dequantize(q, qtype, x.shape)
    assert ours.shape == x.shape and ours.dtype == np.float32
    err = np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-30)
    assert float(err.max()) <= 1e-6


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_matvec(qtype):
    """quants.matvec / matmul route to the kernels: close to the float64 product of the decode."""
    _kernel_or_skip(qtype)
    rng = np.random.default_rng(5)
    x = _source()["blk.0.ffn_down.weight"]
    q = _quantized(qtype, "blk.0.ffn_down.weight")
    W = _decode(q, qtype, x.shape).astype(np.float64)
    v = rng.standard_normal((3, x.shape[1])).astype(np.float32)
    scale = np.abs(v).astype(np.float64) @ np.abs(W).T  # [3, R]
    out = quants.matvec(q, qtype, v[0])
    assert out.shape == (x.shape[0],)
    assert np.max(np.abs(out - W @ v[0]) / scale[0]) <= 1e-2
    out = quants.matvec(q, qtype, v)
    assert out.shape == (3, x.shape[0])
    assert np.max(np.abs(out - v.astype(np.float64) @ W.T) / scale) <= 1e-2


@pytest.mark.parametrize("qtype", TYPES)
def test_importance_lowers_weighted_error(qtype):
    """With a skewed importance vector the importance-weighted error falls (clearly)."""
    rng = np.random.default_rng(7)
    block_size, _ = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    cols = 512
    x = (rng.standard_normal((32, cols)) * 0.02).astype(np.float32)
    imp = np.exp(rng.standard_normal(cols) * 2.0).astype(np.float32)  # spans ~3 decades
    plain = _decode(quants.quantize(x, qtype), qtype, x.shape)
    weighted = _decode(quants.quantize(x, qtype, importance=imp), qtype, x.shape)

    def werr(y):
        return float(np.sum(imp * (y.astype(np.float64) - x) ** 2))

    assert werr(weighted) < 0.97 * werr(plain), (werr(weighted), werr(plain))
    # and the unweighted error does not blow up
    assert _rmse(weighted, x) < 1.5 * _rmse(plain, x)


@lru_cache(maxsize=None)
def _llama_quantize_chunk():
    """llama.cpp's ggml_quantize_chunk from llama-cpp-python (the `bench` extra), or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    for name in ("libggml-base.so", "libggml.so", "libggml-base.dylib", "libggml.dylib"):
        path = Path(llama_cpp.__file__).parent / "lib" / name
        if path.exists() and hasattr(lib := ctypes.CDLL(str(path)), "ggml_quantize_chunk"):
            fn = lib.ggml_quantize_chunk
            fn.restype = ctypes.c_size_t
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            return fn
    return None


@pytest.mark.parametrize("qtype", TYPES)
def test_importance_vs_llama_cpp(qtype):
    """With the same importance vector, the weighted error is at most llama.cpp's (imatrix path)."""
    chunk = _llama_quantize_chunk()
    if chunk is None:
        pytest.skip("llama-cpp-python not installed")
    rng = np.random.default_rng(11)
    rows, cols = 32, 1024
    x = (rng.standard_t(4, (rows, cols)) * np.exp(0.5 * rng.standard_normal(cols)) * 0.02)
    x = np.ascontiguousarray(x, dtype=np.float32)
    imp = np.exp(rng.standard_normal(cols) * 1.5).astype(np.float32)
    ours = _decode(quants.quantize(x, qtype, importance=imp), qtype, x.shape)
    raw = np.empty_like(quants.quantize(x, qtype))
    chunk(int(GGMLQuantizationType[qtype]), x.ctypes.data, raw.ctypes.data, 0, rows, cols,
          imp.ctypes.data)
    ref = _decode(raw, qtype, x.shape)

    def werr(y):
        return float(np.sum(imp * (y.astype(np.float64) - x) ** 2))

    assert werr(ours) <= TOLERANCE * werr(ref), werr(ours) / werr(ref)


@pytest.mark.parametrize("qtype", TYPES)
def test_degenerate_rows(qtype):
    """Zero rows decode to zeros; constant rows, a lone outlier and tiny values stay close."""
    block_size, _ = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    cols = 256
    x = np.zeros((5, cols), np.float32)
    x[1] = 0.5
    x[2] = -3e-3
    x[3, 17] = 40.0
    x[4] = np.linspace(-1e-6, 1e-6, cols)
    y = _decode(quants.quantize(x, qtype), qtype, x.shape)
    assert np.isfinite(y).all()
    assert np.array_equal(y[0], np.zeros(cols, np.float32))
    for r in (1, 2):
        assert np.max(np.abs(y[r] - x[r])) <= 0.05 * abs(x[r, 0]), (r, y[r][:4])
    assert abs(y[3, 17] - 40.0) <= 0.05 * 40.0
    assert np.max(np.abs(y[4] - x[4])) <= 1.01e-6  # near half precision's floor: no worse than 0


def test_output_shape_follows_input():
    x = np.random.default_rng(0).standard_normal((2, 3, 512)).astype(np.float32)
    q = quants.quantize(x, "q4_k")
    assert q.shape == (2, 3, 2 * 144)
    assert np.array_equal(q.reshape(6, -1), quants.quantize(x.reshape(6, 512), "Q4_K"))
    q = quants.quantize(x[0, 0], GGMLQuantizationType.Q8_0)
    assert q.shape == (512 // 32 * 34,)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_types(qtype):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    q = quants.quantize(x, qtype)
    y = _decode(q, qtype, x.shape)
    assert np.allclose(y, x, rtol=2 ** -8, atol=0)


def test_errors_name_the_problem():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="Q9_Z"):
        quants.quantize(x, "Q9_Z")
    with pytest.raises(ValueError, match="IQ2_XXS"):
        quants.quantize(x, "IQ2_XXS")
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        quants.quantize(np.zeros((2, 96), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        quants.quantize(np.zeros((2, 48), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="importance"):
        quants.quantize(x, "Q4_K", importance=np.ones(255, np.float32))
    with pytest.raises(ValueError, match="importance"):
        quants.quantize(x, "Q4_K", importance=-np.ones(256, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        quants.quantize(np.full((1, 256), np.nan, np.float32), "Q6_K")
    with pytest.raises(ValueError, match="Q9_Z"):
        quants.dequantize(np.zeros(144, np.uint8), "Q9_Z", (256,))
    with pytest.raises(ValueError, match="multiple of the block size"):
        quants.dequantize(np.zeros(144, np.uint8), "Q4_K", (1, 200))


def test_half_precision_encoding():
    """The Numba f16 encoder agrees bit for bit with numpy's (round to nearest even)."""
    from flashmoe_gguf.kernels.cpu.quant_common import f16_bits

    rng = np.random.default_rng(3)
    v = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 5, 2000),
        np.float32([0.0, 6.1e-5, 6.103515625e-05, 5.96e-8, 2.98e-8, 65504.0, 1.0, -2.5]),
    ]).astype(np.float32)
    ours = np.array([f16_bits(float(a)) for a in v], np.uint16)
    assert np.array_equal(ours, v.astype(np.float16).view(np.uint16))
