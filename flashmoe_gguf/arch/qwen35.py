"""Qwen3.5 (``qwen35``, dense) and Qwen3.5-MoE (``qwen35moe``): a hybrid of Gated DeltaNet
linear-attention layers and gated full-attention layers, in llama.cpp's GGUF layout.

Each block: x += mixer(rmsnorm(x)); x += ffn(rmsnorm(x)), where the mixer is
- on "recurrent" layers (``attention.recurrent_layers``, or all but every
  ``full_attention_interval``-th layer): a Gated DeltaNet
  in_proj (attn_qkv) -> causal conv1d + SiLU (state: last W-1 inputs) -> q/k L2 norm ->
  gated delta rule (state: S [Hv, Dk, Dv]) -> RMSNorm gated by silu(attn_gate x) -> ssm_out;
- on the others: GQA attention whose q projection also yields a per-head output gate
  (rows [q_h | gate_h] per head), q/k RMSNorm, partial RoPE (neox pairs over the first n_rot
  dimensions, multi-section as llama.cpp's IMROPE with text positions), sigmoid(gate) * attn.
The FFN is the MoE block with a sigmoid-gated shared expert (qwen35moe) or a SwiGLU MLP (qwen35).

GGUF facts (llama.cpp's converter): RMSNorm weights are stored with the +1 of Hugging Face's
zero-centred norms already added (not ssm_norm); ssm_a = -exp(A_log); ssm_dt.bias = dt_bias;
ssm_conv1d is [C, W]; value heads are reordered so that value head h uses key head h % Hk.
MTP (next-token-prediction) blocks appended after ``block_count - nextn_predict_layers`` are
not run.

Letters: T = tokens, D = hidden size, H/Hkv = attention heads, K = attention head size,
C = conv channels, W = conv width, Hk/Hv = DeltaNet key/value heads, Dk/Dv = their sizes.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..errors import ModelError
from ..gguf_file import GGUFFile
from ..kernels import get_format
from ..kernels.cpu import deltanet, ops
from .layers import Embedding, KVCache, Linear, rope_inv_freq
from .llama import DenseMLP
from .moe import MoEMLP


def _vector(gf: GGUFFile, name: str, n: int | tuple[int, ...]) -> np.ndarray:
    """A small weight (norm, bias, conv kernel) as float32 of numpy shape ``n``, from any format
    (dimensions of size 1 are ignored in the comparison: [1, D] reads as [D])."""
    if name not in gf:
        raise ModelError(f"{gf.path}: tensor {name} is missing")
    info = gf.info(name)
    want = n if isinstance(n, tuple) else (n,)
    if [d for d in reversed(info.shape) if d != 1] != [d for d in want if d != 1]:
        raise ModelError(f"{gf.path}: tensor {name} has shape {list(info.shape)}, expected {list(reversed(want))}")
    raw = gf.raw(name)
    raw = raw.reshape(-1, raw.shape[-1])  # [rows, row_bytes]
    out = np.empty((raw.shape[0], info.shape[0]), dtype=np.float32)
    get_format(info.qtype, name).dequantize_rows(raw, np.arange(raw.shape[0], dtype=np.int64), out)
    return np.ascontiguousarray(out.reshape(want))


def _meta(gf: GGUFFile, arch: str, key: str, default=None):
    v = gf.metadata.get(f"{arch}.{key}", default)
    if v is None:
        raise ModelError(f"{gf.path}: metadata key {arch}.{key} is missing")
    return v


class GatedDeltaNet:
    """One linear-attention mixer with its conv and recurrent state."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, il: int, dims: dict):
        p = f"blk.{il}"
        D = cfg.n_embd
        Hk, Hv, Dk, Dv, W = dims["Hk"], dims["Hv"], dims["Dk"], dims["Dv"], dims["W"]
        C = 2 * Hk * Dk + Hv * Dv
        self.Hk, self.Hv, self.Dk, self.Dv, self.C = Hk, Hv, Dk, Dv, C
        self.eps = cfg.norm_eps
        self.wqkv = Linear(gf, f"{p}.attn_qkv.weight", (D, C))  # [C, D]
        self.wz = Linear(gf, f"{p}.attn_gate.weight", (D, Hv * Dv))  # [Hv*Dv, D]
        self.wbeta = Linear(gf, f"{p}.ssm_beta.weight", (D, Hv))  # [Hv, D]
        self.walpha = Linear(gf, f"{p}.ssm_alpha.weight", (D, Hv))  # [Hv, D]
        self.dt_bias = _vector(gf, f"{p}.ssm_dt.bias", Hv)  # [Hv]
        self.a = _vector(gf, f"{p}.ssm_a", Hv)  # [Hv] = -exp(A_log)
        self.conv_w = np.ascontiguousarray(_vector(gf, f"{p}.ssm_conv1d.weight", (C, W)).T)  # [W, C]
        self.norm = _vector(gf, f"{p}.ssm_norm.weight", Dv)  # [Dv]
        self.wout = Linear(gf, f"{p}.ssm_out.weight", (Hv * Dv, D))  # [D, Hv*Dv]
        self.conv_state = np.zeros((W - 1, C), dtype=np.float32)  # [W-1, C]
        self.state = np.zeros((Hv, Dk, Dv), dtype=np.float32)  # [Hv, Dk, Dv]

    def reset(self) -> None:
        self.conv_state.fill(0.0)
        self.state.fill(0.0)

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """h [T, D] (normed) -> [T, D]; advances the states by T tokens."""
        T = h.shape[0]
        Hk, Hv, Dk, Dv = self.Hk, self.Hv, self.Dk, self.Dv
        qkv = self.wqkv(h)  # [T, C]
        z = self.wz(h).reshape(T, Hv, Dv)
        beta = self.wbeta(h)  # [T, Hv]
        alpha = self.walpha(h)  # [T, Hv]
        xc = np.empty_like(qkv)  # [T, C]
        deltanet.conv1d_silu(qkv, self.conv_state, self.conv_w, xc)
        nk = Hk * Dk
        q = np.ascontiguousarray(xc[:, :nk]).reshape(T, Hk, Dk)
        k = np.ascontiguousarray(xc[:, nk : 2 * nk]).reshape(T, Hk, Dk)
        v = np.ascontiguousarray(xc[:, 2 * nk :]).reshape(T, Hv, Dv)
        deltanet.l2norm_heads(q, self.eps, 1.0 / math.sqrt(Dk))
        deltanet.l2norm_heads(k, self.eps, 1.0)
        beta = (1.0 / (1.0 + np.exp(-beta))).astype(np.float32)
        x = alpha + self.dt_bias
        softplus = np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))  # as ggml_softplus
        g = (softplus * self.a).astype(np.float32)  # [T, Hv], log of the per-token decay
        o = np.empty((T, Hv, Dv), dtype=np.float32)
        deltanet.delta_rule(q, k, v, g, beta, self.state, o)
        deltanet.gated_rmsnorm(o, z, self.norm, self.eps)
        return self.wout(o.reshape(T, Hv * Dv))


class GatedAttention:
    """Full attention with a sigmoid output gate per head and partial RoPE; one KV cache slot."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, il: int):
        p = f"blk.{il}"
        D, H, Hkv, K = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim
        if cfg.head_dim_v != K:
            raise ModelError(f"{gf.path}: key_length {K} != value_length {cfg.head_dim_v}")
        self.wq = Linear(gf, f"{p}.attn_q.weight", (D, 2 * H * K))  # [H*2K, D]: per head [q | gate]
        self.wk = Linear(gf, f"{p}.attn_k.weight", (D, Hkv * K))  # [Hkv*K, D]
        self.wv = Linear(gf, f"{p}.attn_v.weight", (D, Hkv * K))  # [Hkv*K, D]
        self.wo = Linear(gf, f"{p}.attn_output.weight", (H * K, D))  # [D, H*K]
        self.q_norm = _vector(gf, f"{p}.attn_q_norm.weight", K)  # [K]
        self.k_norm = _vector(gf, f"{p}.attn_k_norm.weight", K)  # [K]


class Block:
    def __init__(self, gf: GGUFFile, cfg: ModelConfig, il: int, mixer, mlp):
        p = f"blk.{il}"
        self.attn_norm = _vector(gf, f"{p}.attn_norm.weight", cfg.n_embd)  # [D]
        self.ffn_norm = _vector(gf, f"{p}.post_attention_norm.weight", cfg.n_embd)  # [D]
        self.mixer = mixer  # GatedDeltaNet | GatedAttention
        self.mlp = mlp


class Qwen35Model:
    """Weights as views of the file; a KV cache for the attention layers and conv + recurrent
    states for the DeltaNet layers. The states hold one position: forward() continues from the
    last position computed, or starts over at position 0 (no rewinding to a cached prefix)."""

    supports_prefix_reuse = False

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, n_ctx: int, store=None):
        arch = cfg.arch
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.store = store
        D = cfg.n_embd
        n_nextn = int(gf.metadata.get(f"{arch}.nextn_predict_layers", 0) or 0)
        n_layer = cfg.n_layer - n_nextn
        dims = dict(
            Dk=int(_meta(gf, arch, "ssm.state_size")),
            Hk=int(_meta(gf, arch, "ssm.group_count")),
            Hv=int(_meta(gf, arch, "ssm.time_step_rank")),
            W=int(_meta(gf, arch, "ssm.conv_kernel")),
        )
        inner = int(_meta(gf, arch, "ssm.inner_size"))
        if dims["Hv"] <= 0 or inner % dims["Hv"] or dims["Hk"] <= 0 or dims["Hv"] % dims["Hk"] or dims["W"] < 1:
            raise ModelError(f"{gf.path}: inconsistent ssm sizes {dims}, inner_size {inner}")
        dims["Dv"] = inner // dims["Hv"]
        self.recurrent = self._layer_kinds(gf, arch, n_layer)  # [n_layer] bool
        if cfg.n_head % cfg.n_head_kv:
            raise ModelError(f"{gf.path}: head_count {cfg.n_head} is not a multiple of head_count_kv {cfg.n_head_kv}")
        if cfg.n_rot > cfg.head_dim or cfg.n_rot % 2:
            raise ModelError(f"{gf.path}: rope.dimension_count {cfg.n_rot} does not fit head size {cfg.head_dim}")
        self.tok_embd = Embedding(gf, "token_embd.weight", D)
        self.n_vocab = self.tok_embd.n_vocab
        self.output_norm = _vector(gf, "output_norm.weight", D)
        out_name = "output.weight" if "output.weight" in gf else "token_embd.weight"
        self.output = Linear(gf, out_name, (D, self.n_vocab))  # [V, D]
        self.inv_freq, self.attn_factor = rope_inv_freq(cfg)
        self._mask_rope_sections(gf.metadata.get(f"{arch}.rope.dimension_sections"))
        self.blocks = []
        for il in range(n_layer):
            mixer = GatedDeltaNet(gf, cfg, il, dims) if self.recurrent[il] else GatedAttention(gf, cfg, il)
            if f"blk.{il}.ffn_gate_inp.weight" in gf:
                mlp = MoEMLP(gf, cfg, f"blk.{il}", store=store)
                mlp.norm_topk = True  # llama.cpp always renormalizes the top-k weights here
                mlp.gating = "softmax"
            else:
                mlp = DenseMLP(gf, f"blk.{il}", D, cfg.n_ff)
            self.blocks.append(Block(gf, cfg, il, mixer, mlp))
        n_attn = int(np.count_nonzero(~self.recurrent))
        self.cache = KVCache(n_attn, n_ctx, cfg.n_head_kv, cfg.head_dim, cfg.head_dim)
        self._kv_slot = np.cumsum(~self.recurrent) - 1  # layer -> KV cache slot
        self.scale = np.float32(1.0 / math.sqrt(cfg.head_dim))
        self.n_past = 0  # position the recurrent states are at

    @staticmethod
    def _layer_kinds(gf: GGUFFile, arch: str, n_layer: int) -> np.ndarray:
        """Which layers are DeltaNet layers: the per-layer flags when the file has them (newer
        converters write them), else every ``full_attention_interval``-th layer is attention."""
        flags = gf.metadata.get(f"{arch}.attention.recurrent_layers")
        if flags is not None:
            flags = np.asarray(flags, dtype=bool).reshape(-1)
            if flags.shape[0] < n_layer:
                raise ModelError(f"{gf.path}: {arch}.attention.recurrent_layers has {flags.shape[0]} entries, "
                                 f"expected {n_layer}")
            return flags[:n_layer].copy()
        interval = int(gf.metadata.get(f"{arch}.full_attention_interval", 4) or 4)
        return np.array([(i + 1) % interval != 0 for i in range(n_layer)], dtype=bool)

    def _mask_rope_sections(self, sections) -> None:
        """llama.cpp rotates text tokens with IMROPE: pair i takes the position of section
        (i % sum) % 3 while that section lasts, else the 4th position, which is 0 for text."""
        if sections is None:
            return
        s = [int(v) for v in np.asarray(sections).reshape(-1)[:4]] + [0] * 4
        total = sum(s[:4])
        if total <= 0:
            return
        inv = self.inv_freq.copy()
        for i in range(inv.shape[0]):
            sec = i % total
            if not ((sec % 3 == 0 and sec < 3 * s[0]) or (sec % 3 == 1 and sec < 3 * s[1])
                    or (sec % 3 == 2 and sec < 3 * s[2])):
                inv[i] = 0.0  # rotated by position 0: unchanged
        self.inv_freq = inv

    def reset(self) -> None:
        for blk in self.blocks:
            if isinstance(blk.mixer, GatedDeltaNet):
                blk.mixer.reset()
        self.n_past = 0

    def _attention(self, m: GatedAttention, h: np.ndarray, il: int, pos0: int) -> np.ndarray:
        cfg = self.cfg
        T = h.shape[0]
        H, Hkv, K = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        qg = m.wq(h).reshape(T, H, 2 * K)
        q = np.ascontiguousarray(qg[:, :, :K])  # [T, H, K]
        gate = qg[:, :, K:]  # [T, H, K]
        k = m.wk(h).reshape(T, Hkv, K)
        v = m.wv(h).reshape(T, Hkv, K)
        ops.rmsnorm_heads(q, m.q_norm, cfg.norm_eps)
        ops.rmsnorm_heads(k, m.k_norm, cfg.norm_eps)
        positions = np.arange(pos0, pos0 + T, dtype=np.int64)
        ops.rope(q, positions, self.inv_freq, self.attn_factor, True)
        ops.rope(k, positions, self.inv_freq, self.attn_factor, True)
        slot = self._kv_slot[il]
        kc, vc = self.cache.k[slot], self.cache.v[slot]
        kc[pos0 : pos0 + T] = k
        vc[pos0 : pos0 + T] = v
        attn = np.empty((T, H, K), dtype=np.float32)
        ops.attention(q, kc, vc, pos0, self.scale, attn)
        attn *= 1.0 / (1.0 + np.exp(-gate))
        return m.wo(attn.reshape(T, H * K))

    def forward(self, ids: np.ndarray, pos0: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens ``ids`` at positions pos0.. (pos0 = 0 starts over; otherwise pos0 must be
        where the previous call ended). Returns logits [T, n_vocab] if all_logits else [1, n_vocab]."""
        if pos0 == 0:
            self.reset()
        elif pos0 != self.n_past:
            raise ModelError(f"the recurrent state is at position {self.n_past}; cannot continue from {pos0}")
        T = len(ids)
        if pos0 + T > self.n_ctx:
            raise ModelError(f"positions {pos0}..{pos0 + T - 1} do not fit the context of {self.n_ctx}")
        cfg = self.cfg
        x = self.tok_embd(ids)  # [T, D]
        h = np.empty_like(x)  # [T, D]
        for il, blk in enumerate(self.blocks):
            ops.rmsnorm(x, blk.attn_norm, cfg.norm_eps, h)
            if isinstance(blk.mixer, GatedDeltaNet):
                y = blk.mixer(h)
            else:
                y = self._attention(blk.mixer, h, il, pos0)
            ops.add_inplace(x, y)
            ops.rmsnorm(x, blk.ffn_norm, cfg.norm_eps, h)
            blk.mlp(h, out=x)
        self.n_past = pos0 + T
        if not all_logits:
            x = x[T - 1 :]
        ops.rmsnorm(x, self.output_norm, cfg.norm_eps, h[: x.shape[0]])
        return self.output(h[: x.shape[0]])  # [T or 1, n_vocab]
