"""The llama family of decoders: llama (and mistral, which llama.cpp stores as llama), qwen2
(q/k/v biases), qwen3 (per-head q/k RMSNorm), and their MoE variants: llama with experts
(mixtral), qwen2moe (gated shared expert), qwen3moe, olmoe (q/k RMSNorm over all heads).
Pre-norm blocks: RMSNorm -> GQA attention with RoPE -> residual -> RMSNorm -> MLP or MoE -> residual.

T = tokens in the batch, D = hidden size, H/Hkv = query/kv heads, K/V = head sizes, F = MLP width.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..errors import ModelError
from ..gguf_file import GGUFFile
from ..kernels.cpu import ops
from .layers import Embedding, KVCache, Linear, rope_inv_freq
from .moe import MoEMLP


class DenseMLP:
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, gf: GGUFFile, prefix: str, D: int, F: int):
        self.gate = Linear(gf, f"{prefix}.ffn_gate.weight", (D, F))  # [F, D]
        self.up = Linear(gf, f"{prefix}.ffn_up.weight", (D, F))  # [F, D]
        self.down = Linear(gf, f"{prefix}.ffn_down.weight", (F, D))  # [D, F]

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The block's output for x [T, D]; with ``out``, added to it."""
        g = self.gate(x)  # [T, F]
        u = self.up(x)  # [T, F]
        ops.silu_mul(g, u)
        y = self.down(g)  # [T, D]
        if out is None:
            return y
        ops.add_inplace(out, y)
        return out


class Block:
    def __init__(self, gf: GGUFFile, cfg: ModelConfig, il: int, mlp):
        p = f"blk.{il}"
        D, H, Hkv, K, V = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
        self.attn_norm = _norm(gf, f"{p}.attn_norm.weight", D)  # [D]
        self.wq = Linear(gf, f"{p}.attn_q.weight", (D, H * K), bias=f"{p}.attn_q.bias")  # [H*K, D]
        self.wk = Linear(gf, f"{p}.attn_k.weight", (D, Hkv * K), bias=f"{p}.attn_k.bias")  # [Hkv*K, D]
        self.wv = Linear(gf, f"{p}.attn_v.weight", (D, Hkv * V), bias=f"{p}.attn_v.bias")  # [Hkv*V, D]
        self.wo = Linear(gf, f"{p}.attn_output.weight", (H * V, D), bias=f"{p}.attn_output.bias")  # [D, H*V]
        # q/k RMSNorm: per head [K] (qwen3, qwen3moe) or over all heads [H*K] / [Hkv*K] (olmoe)
        self.q_norm = _norm(gf, f"{p}.attn_q_norm.weight", (K, H * K), optional=True)
        self.k_norm = _norm(gf, f"{p}.attn_k_norm.weight", (K, Hkv * K), optional=True)
        self.ffn_norm = _norm(gf, f"{p}.ffn_norm.weight", D)  # [D]
        self.mlp = mlp


def _norm(gf: GGUFFile, name: str, n: int | tuple[int, ...], optional: bool = False) -> np.ndarray | None:
    if optional and name not in gf:
        return None
    w = gf.float_view(name)
    sizes = n if isinstance(n, tuple) else (n,)
    if w.ndim != 1 or w.shape[0] not in sizes:
        raise ModelError(f"{gf.path}: tensor {name} has shape {list(w.shape)}, expected one of {list(sizes)}")
    return w


def _qk_norm(x: np.ndarray, w: np.ndarray, eps: float) -> None:
    """In-place RMSNorm of q or k [T, heads, K]: per head, or over all heads when w is [heads*K]."""
    T, nh, K = x.shape
    if w.shape[0] == K:
        ops.rmsnorm_heads(x, w, eps)
    else:
        flat = x.reshape(T, nh * K)
        ops.rmsnorm(flat, w, eps, flat)


class LlamaModel:
    """Weights as views of the file, a preallocated KV cache, and a batched forward pass."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, n_ctx: int, store=None):
        if cfg.n_head % cfg.n_head_kv:
            raise ModelError(f"{gf.path}: head_count {cfg.n_head} is not a multiple of head_count_kv {cfg.n_head_kv}")
        if cfg.n_rot > cfg.head_dim or cfg.n_rot % 2:
            raise ModelError(f"{gf.path}: rope.dimension_count {cfg.n_rot} does not fit head size {cfg.head_dim}")
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.store = store  # ExpertStore of a MoE model (prefetch, stats), or None
        D = cfg.n_embd
        self.tok_embd = Embedding(gf, "token_embd.weight", D)
        n_vocab = self.tok_embd.n_vocab
        self.output_norm = _norm(gf, "output_norm.weight", D)
        out_name = "output.weight" if "output.weight" in gf else "token_embd.weight"  # tied embeddings
        self.output = Linear(gf, out_name, (D, n_vocab))  # [V, D]
        factors = gf.float_view("rope_freqs.weight") if "rope_freqs.weight" in gf else None
        self.inv_freq, self.attn_factor = rope_inv_freq(cfg, factors)
        self.blocks = [Block(gf, cfg, il, self._mlp(gf, cfg, il)) for il in range(cfg.n_layer)]
        self.cache = KVCache(cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v)
        self.scale = np.float32(1.0 / math.sqrt(cfg.head_dim))
        self.n_vocab = n_vocab

    def _mlp(self, gf: GGUFFile, cfg: ModelConfig, il: int):
        if f"blk.{il}.ffn_gate_inp.weight" in gf:
            return MoEMLP(gf, cfg, f"blk.{il}", store=self.store)
        return DenseMLP(gf, f"blk.{il}", cfg.n_embd, cfg.n_ff)

    def forward(self, ids: np.ndarray, pos0: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens ``ids`` at positions pos0.. through the model, filling the KV cache.

        Returns logits [T, n_vocab] if all_logits else [1, n_vocab] for the last token.
        """
        cfg = self.cfg
        T = len(ids)
        H, Hkv, K, V = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
        positions = np.arange(pos0, pos0 + T, dtype=np.int64)
        x = self.tok_embd(ids)  # [T, D]
        h = np.empty_like(x)  # [T, D]
        attn = np.empty((T, H, V), dtype=np.float32)
        for il, blk in enumerate(self.blocks):
            ops.rmsnorm(x, blk.attn_norm, cfg.norm_eps, h)
            q = blk.wq(h).reshape(T, H, K)
            k = blk.wk(h).reshape(T, Hkv, K)
            v = blk.wv(h).reshape(T, Hkv, V)
            if blk.q_norm is not None:
                _qk_norm(q, blk.q_norm, cfg.norm_eps)
            if blk.k_norm is not None:
                _qk_norm(k, blk.k_norm, cfg.norm_eps)
            ops.rope(q, positions, self.inv_freq, self.attn_factor, cfg.rope_neox)
            ops.rope(k, positions, self.inv_freq, self.attn_factor, cfg.rope_neox)
            kc, vc = self.cache.k[il], self.cache.v[il]
            kc[pos0 : pos0 + T] = k
            vc[pos0 : pos0 + T] = v
            ops.attention(q, kc, vc, pos0, self.scale, attn)
            ops.add_inplace(x, blk.wo(attn.reshape(T, H * V)))
            ops.rmsnorm(x, blk.ffn_norm, cfg.norm_eps, h)
            blk.mlp(h, out=x)
        if not all_logits:
            x = x[T - 1 :]
        ops.rmsnorm(x, self.output_norm, cfg.norm_eps, h[: x.shape[0]])
        return self.output(h[: x.shape[0]])  # [T or 1, n_vocab]
