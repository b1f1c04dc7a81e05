"""gpt-oss (llama.cpp's ``gpt-oss``, its graph is "openai-moe"): GQA attention with biases on
q/k/v/o, a learned sink logit per head, sliding-window attention on alternate layers, YaRN RoPE
(neox pairs); every FFN is an MoE whose router has a bias, whose weights are a softmax over the
selected experts' logits, and whose experts (usually MXFP4) have biases and a clamped SwiGLU:
    g = min(gate, 7); u = clamp(up, -7, 7); out = down(g * sigmoid(1.702 g) * (u + 1)).

Each block: x += attn(rmsnorm(x)); x += moe(rmsnorm(x)) (the second norm is post_attention_norm).
Sliding layers: by ``attention.sliding_window_pattern`` when present (per-layer flags, or a period
n: layer il slides iff il % n < n - 1), else every even layer, as llama.cpp; a query at position p
sees keys p - window < j <= p. The KV cache keeps every position on all layers (no ring buffer),
so the cached prefix can always be reused.

GGUF facts (llama.cpp's convert_hf_to_gguf.py): gate_up_proj [E, D, 2F] holds gate and up
interleaved along 2F (gate = even, up = odd) and is split into ffn_gate_exps / ffn_up_exps
(numpy [E, F, D]); down_proj [E, F, D] -> ffn_down_exps [E, D, F]; sinks -> attn_sinks.weight;
post_attention_layernorm -> post_attention_norm; router -> ffn_gate_inp (.weight, .bias).
llama.cpp always truncates YaRN's correction range to whole dimensions (gpt-oss's config says
truncate: false, which transformers honours): the frequencies of the few pairs inside the ramp
differ slightly from transformers'; this module follows llama.cpp.

Letters: T = tokens, D = hidden size, H/Hkv = query/kv heads, K = head size, E = experts.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..config import ModelConfig
from ..errors import ModelError
from ..gguf_file import GGUFFile
from ..kernels.cpu import ops, ops_ext
from .deepseek2 import f32_vector
from .layers import Embedding, KVCache, Linear, rope_inv_freq
from .moe import MoEMLP


def sliding_layers(md, arch: str, n_layer: int) -> np.ndarray:
    """[n_layer] bool: which layers use the sliding window (llama.cpp's load_swa_pattern(2))."""
    pat = md.get(f"{arch}.attention.sliding_window_pattern")
    if pat is not None and np.asarray(pat).ndim == 1 and np.asarray(pat).size > 1:
        flags = np.asarray(pat, dtype=bool).reshape(-1)
        if flags.shape[0] < n_layer:
            raise ModelError(f"{arch}.attention.sliding_window_pattern has {flags.shape[0]} entries, expected {n_layer}")
        return flags[:n_layer].copy()
    n = int(np.asarray(pat).reshape(-1)[0]) if pat is not None else 2
    return np.array([n == 0 or il % n < n - 1 for il in range(n_layer)], dtype=bool)


class Block:
    def __init__(self, gf: GGUFFile, cfg: ModelConfig, il: int, store):
        p = f"blk.{il}"
        D, H, Hkv, K = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim
        self.attn_norm = f32_vector(gf, f"{p}.attn_norm.weight", D)  # [D]
        self.wq = Linear(gf, f"{p}.attn_q.weight", (D, H * K), bias=f"{p}.attn_q.bias")  # [H*K, D]
        self.wk = Linear(gf, f"{p}.attn_k.weight", (D, Hkv * K), bias=f"{p}.attn_k.bias")  # [Hkv*K, D]
        self.wv = Linear(gf, f"{p}.attn_v.weight", (D, Hkv * K), bias=f"{p}.attn_v.bias")  # [Hkv*K, D]
        self.wo = Linear(gf, f"{p}.attn_output.weight", (H * K, D), bias=f"{p}.attn_output.bias")  # [D, H*K]
        self.sinks = f32_vector(gf, f"{p}.attn_sinks.weight", H)  # [H]
        self.ffn_norm = f32_vector(gf, f"{p}.post_attention_norm.weight", D)  # [D]
        self.mlp = MoEMLP(gf, cfg, p, store=store)
        self.mlp.gating = "softmax_weight"
        self.mlp.act = "swiglu_oai"
        self.mlp.norm_topk = False


class GptOssModel:
    """Weights as views of the file, a preallocated KV cache, and a batched forward pass."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, n_ctx: int, store=None):
        arch, md = cfg.arch, gf.metadata
        if cfg.n_head % cfg.n_head_kv:
            raise ModelError(f"{gf.path}: head_count {cfg.n_head} is not a multiple of head_count_kv {cfg.n_head_kv}")
        if cfg.n_rot != cfg.head_dim or cfg.head_dim_v != cfg.head_dim:
            raise ModelError(f"{gf.path}: gpt-oss needs rope.dimension_count = key_length = value_length, got "
                             f"{cfg.n_rot}, {cfg.head_dim}, {cfg.head_dim_v}")
        if not cfg.is_moe:
            raise ModelError(f"{gf.path}: gpt-oss without experts")
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.store = store
        D = cfg.n_embd
        self.window = int(md.get(f"{arch}.attention.sliding_window", 0) or 0)
        self.sliding = sliding_layers(md, arch, cfg.n_layer) if self.window > 0 else np.zeros(cfg.n_layer, bool)
        self.tok_embd = Embedding(gf, "token_embd.weight", D)
        self.n_vocab = self.tok_embd.n_vocab
        self.output_norm = f32_vector(gf, "output_norm.weight", D)
        out_name = "output.weight" if "output.weight" in gf else "token_embd.weight"
        self.output = Linear(gf, out_name, (D, self.n_vocab))  # [V, D]
        self.inv_freq, self.attn_factor = rope_inv_freq(cfg)
        base_swa = md.get(f"{arch}.rope.freq_base_swa")
        if base_swa is not None and float(base_swa) != cfg.rope_base:
            self.inv_freq_swa, _ = rope_inv_freq(dataclasses.replace(cfg, rope_base=float(base_swa)))
        else:
            self.inv_freq_swa = self.inv_freq
        self.blocks = [Block(gf, cfg, il, store) for il in range(cfg.n_layer)]
        self.cache = KVCache(cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim, cfg.head_dim)
        self.scale = np.float32(1.0 / math.sqrt(cfg.head_dim))

    def forward(self, ids: np.ndarray, pos0: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens ``ids`` at positions pos0.. through the model, filling the KV cache.

        Returns logits [T, n_vocab] if all_logits else [1, n_vocab] for the last token.
        """
        cfg = self.cfg
        T = len(ids)
        if pos0 + T > self.n_ctx:
            raise ModelError(f"positions {pos0}..{pos0 + T - 1} do not fit the context of {self.n_ctx}")
        H, Hkv, K = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        positions = np.arange(pos0, pos0 + T, dtype=np.int64)
        x = self.tok_embd(ids)  # [T, D]
        h = np.empty_like(x)  # [T, D]
        attn = np.empty((T, H, K), dtype=np.float32)
        for il, blk in enumerate(self.blocks):
            slide = bool(self.sliding[il])
            inv_freq = self.inv_freq_swa if slide else self.inv_freq
            ops.rmsnorm(x, blk.attn_norm, cfg.norm_eps, h)
            q = blk.wq(h).reshape(T, H, K)
            k = blk.wk(h).reshape(T, Hkv, K)
            v = blk.wv(h).reshape(T, Hkv, K)
            ops.rope(q, positions, inv_freq, self.attn_factor, True)
            ops.rope(k, positions, inv_freq, self.attn_factor, True)
            kc, vc = self.cache.k[il], self.cache.v[il]
            kc[pos0 : pos0 + T] = k
            vc[pos0 : pos0 + T] = v
            ops_ext.attention(q, kc, vc, pos0, self.scale, blk.sinks, self.window if slide else 0, attn)
            ops.add_inplace(x, blk.wo(attn.reshape(T, H * K)))
            ops.rmsnorm(x, blk.ffn_norm, cfg.norm_eps, h)
            blk.mlp(h, out=x)
        if not all_logits:
            x = x[T - 1 :]
        ops.rmsnorm(x, self.output_norm, cfg.norm_eps, h[: x.shape[0]])
        return self.output(h[: x.shape[0]])  # [T or 1, n_vocab]
