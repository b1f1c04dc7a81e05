"""Building blocks shared by the architectures: weight products, embeddings, RoPE tables, KV cache.

Letters: T = tokens in the batch, D = hidden size, H/Hkv = query/key-value heads,
K/V = head sizes of q-k/v, N = context slots, F = MLP width.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..errors import ModelError
from ..gguf_file import GGUFFile
from ..kernels import get_format


class Linear:
    """y = W x (+ b) for a GGUF weight W of shape ggml [cols, rows] in any supported block format.

    The weight stays in the mmapped file, in its block format (``w`` is a zero-copy view).
    """

    __slots__ = ("name", "qtype", "w", "rows", "cols", "bias", "_matvec", "_matmul")

    def __init__(self, gf: GGUFFile, name: str, shape: tuple[int, int] | None = None, bias: str | None = None):
        info = gf.info(name)
        if len(info.shape) != 2 or (shape is not None and tuple(info.shape) != tuple(shape)):
            raise ModelError(f"{gf.path}: tensor {name} has shape {list(info.shape)}, expected {list(shape or ())}")
        fmt = get_format(info.qtype, name)
        self.name = name
        self.qtype = info.qtype
        self.cols, self.rows = info.shape
        self.w = gf.raw(name)  # [rows, row_bytes] u8
        self._matvec = fmt.matvec
        self._matmul = fmt.matmul
        self.bias = None
        if bias is not None and bias in gf:
            b = gf.float_view(bias)
            if b.shape != (self.rows,):
                raise ModelError(f"{gf.path}: tensor {bias} has shape {list(b.shape)}, expected [{self.rows}]")
            self.bias = b

    @property
    def n_bytes(self) -> int:
        return self.w.nbytes

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x [T, cols] f32 -> [T, rows] f32"""
        T = x.shape[0]
        if out is None:
            out = np.empty((T, self.rows), dtype=np.float32)
        if T == 1:
            self._matvec(self.w, x[0], out[0])
        else:
            self._matmul(self.w, x, out)
        if self.bias is not None:
            out += self.bias
        return out


class Embedding:
    """Token embedding lookup: dequantizes only the requested rows."""

    def __init__(self, gf: GGUFFile, name: str, n_embd: int):
        info = gf.info(name)
        if len(info.shape) != 2 or info.shape[0] != n_embd:
            raise ModelError(f"{gf.path}: tensor {name} has shape {list(info.shape)}, expected [{n_embd}, n_vocab]")
        self.fmt = get_format(info.qtype, name)
        self.w = gf.raw(name)  # [V, row_bytes]
        self.n_vocab = info.shape[1]
        self.n_embd = n_embd

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.n_embd), dtype=np.float32)
        self.fmt.dequantize_rows(self.w, np.ascontiguousarray(ids, dtype=np.int64), out)
        return out


def rope_inv_freq(cfg: ModelConfig, factors: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies (float32, as llama.cpp computes them) and the attention
    magnitude factor, with the metadata's scaling applied."""
    n_rot = cfg.n_rot
    i = np.arange(0, n_rot, 2, dtype=np.float32)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_base), i / np.float32(n_rot))).astype(np.float32)
    attn_factor = 1.0
    if factors is not None:  # llama3-style per-dimension factors stored as a tensor (rope_freqs)
        if factors.shape[0] != inv_freq.shape[0]:
            raise ModelError(f"rope_freqs has {factors.shape[0]} values, expected {inv_freq.shape[0]}")
        inv_freq = (inv_freq / factors.astype(np.float32)).astype(np.float32)
    if cfg.rope_scaling == "linear" and cfg.rope_scale != 1.0:
        inv_freq = (inv_freq / np.float32(cfg.rope_scale)).astype(np.float32)
    elif cfg.rope_scaling == "yarn" and cfg.rope_scale != 1.0:
        inv_freq, attn_factor = _yarn(cfg, inv_freq)
    elif cfg.rope_scaling not in ("none", "linear", "yarn", ""):
        raise ModelError(f"unsupported rope scaling type {cfg.rope_scaling!r}")
    return np.ascontiguousarray(inv_freq, dtype=np.float32), attn_factor


def _yarn(cfg: ModelConfig, inv_freq: np.ndarray) -> tuple[np.ndarray, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between (beta_fast=32, beta_slow=1)."""
    s = cfg.rope_scale
    orig = cfg.rope_orig_ctx or cfg.n_ctx_train
    n_rot = cfg.n_rot

    def corr_dim(n_rotations: float) -> float:
        return n_rot * math.log(orig / (n_rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_base))

    low = max(math.floor(corr_dim(32.0)), 0)
    high = min(math.ceil(corr_dim(1.0)), n_rot - 1)
    i = np.arange(inv_freq.shape[0], dtype=np.float64)
    ramp = np.clip((i - low) / max(high - low, 1e-3), 0.0, 1.0)
    extrap = 1.0 - ramp  # 1 = keep the original frequency
    out = inv_freq / s * (1.0 - extrap) + inv_freq * extrap
    attn_factor = 0.1 * math.log(s) + 1.0
    return out.astype(np.float32), attn_factor


class KVCache:
    """Preallocated per-layer K and V, float32.   k [L][N, Hkv, K]; v [L][N, Hkv, V]"""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, head_dim_v: int):
        self.n_ctx = n_ctx
        # np.zeros maps untouched pages lazily: memory is used as the context fills.
        self.k = [np.zeros((n_ctx, n_head_kv, head_dim), dtype=np.float32) for _ in range(n_layer)]
        self.v = [np.zeros((n_ctx, n_head_kv, head_dim_v), dtype=np.float32) for _ in range(n_layer)]

    @property
    def bytes_per_token(self) -> int:
        return sum(k[0].nbytes + v[0].nbytes for k, v in zip(self.k, self.v))
