"""DeepSeek-V2/V3/R1 and Kimi-K2 (llama.cpp's ``deepseek2``): multi-head latent attention (MLA),
leading dense layers, then MoE layers with shared experts (V3: sigmoid routing with a
score-correction bias, group-limited top-k, renormalized and scaled weights).

Each block: x += MLA(rmsnorm(x)); x += ffn(rmsnorm(x)), where MLA is, per token,
    q      = q_b(rmsnorm(q_a(x)))  (or q(x) without a q LoRA)  -> per head [q_nope | q_pe]
    kv     = kv_a_mqa(x) = [c | k_pe]; c = rmsnorm(c)   (the latent, shared by all heads)
    q_pe, k_pe rotated (RoPE on adjacent pairs, YaRN-scaled)
and attention runs in the absorbed form llama.cpp uses: each head's q_nope is multiplied by its
k_b (q_lat = k_b^T q_nope), scores are q_lat . c_j + q_pe . k_pe_j, the softmax-weighted sum of
the latents c_j is expanded by the head's v_b, then attn_output. The KV cache therefore holds only
c and k_pe per token (C + R floats per layer), not per-head keys and values.

GGUF facts (llama.cpp's convert_hf_to_gguf.py): head_count_kv = 1, key_length = C + R,
value_length = C, key_length_mla / value_length_mla = per-head sizes of q-k and v;
kv_b_proj is split per head into attn_k_b (stored transposed, ggml [nope, C, H]) and attn_v_b
(ggml [C, V, H]). Older files keep attn_kv_b (ggml [C, H*(nope+V)]) and no *_mla keys; both load.
rope.scaling.yarn_log_multiplier is written as 0.1 * mscale_all_dim.

Letters: T = tokens, D = hidden size, H = heads, C = kv_lora_rank, R = rotary size,
Kn = nope size of q-k, V = value head size, N = context slots.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..errors import ModelError
from ..gguf_file import GGUFFile
from ..kernels import get_format
from ..kernels.cpu import ops, ops_ext
from .layers import Embedding, Linear, rope_inv_freq
from .llama import DenseMLP
from .moe import MoEMLP, float_tensor


def f32_vector(gf: GGUFFile, name: str, n: int) -> np.ndarray:
    """A 1-D weight (norm, bias, sinks) of length n as float32 (a view of the file when F32)."""
    w = float_tensor(gf, name, (n,))
    if w is None:
        raise ModelError(f"{gf.path}: tensor {name} is missing")
    return w


def get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def mla_scales(cfg: ModelConfig, md, k_head: int) -> tuple[float, float]:
    """(RoPE magnitude, kq scale) as llama.cpp computes them for deepseek2.

    llama.cpp folds YaRN's attention factor into the kq scale instead of the rotation: the
    context sets attn_factor = get_mscale(s, m) / get_mscale(s, L) / (1 + 0.1 ln s) (times
    rope.scaling.attn_factor), with L = mscale_all_dim (read back from yarn_log_multiplier / 0.1)
    and m = L for deepseek2 - so 1 / (1 + 0.1 ln s) when L is set; ggml's YaRN rotation
    multiplies by (1 + 0.1 ln s) again, and the graph uses
    kq_scale = (attn_factor (1 + 0.1 ln s) (1 + 0.1 L ln s))^2 / sqrt(k_head),
    which is transformers' softmax_scale * mscale(s, mscale_all_dim)^2 with unscaled cos/sin.
    """
    arch = cfg.arch
    s = cfg.rope_scale if cfg.rope_scaling in ("yarn", "linear") else 1.0
    yarn = cfg.rope_scaling == "yarn"
    L = float(md.get(f"{arch}.rope.scaling.yarn_log_multiplier", 0.0) or 0.0) / 0.1
    f = 1.0
    if yarn:
        if L != 0.0:
            m = L if L != 1.0 else 1.0
            f = get_mscale(s, m) / get_mscale(s, L)
        else:
            f = get_mscale(s, 1.0)
        f /= 1.0 + 0.1 * math.log(s)
    f *= float(md.get(f"{arch}.rope.scaling.attn_factor", 1.0) or 1.0)
    rope_mag = f * (1.0 + 0.1 * math.log(s)) if yarn else f
    mscale = f * (1.0 + 0.1 * math.log(s)) * (1.0 + 0.1 * L * math.log(s))
    return rope_mag, mscale * mscale / math.sqrt(k_head)


class PerHead:
    """A 3-D weight ggml [cols, rows, H]: one [rows, cols] matrix per head, in its block format."""

    def __init__(self, gf: GGUFFile, name: str, cols: int, rows: int, n_head: int):
        info = gf.info(name)
        if tuple(info.shape) != (cols, rows, n_head):
            raise ModelError(f"{gf.path}: tensor {name} has shape {list(info.shape)}, expected {[cols, rows, n_head]}")
        fmt = get_format(info.qtype, name)
        self.w = gf.raw(name)  # [H, rows, row_bytes] u8
        self.rows, self.cols, self.n_head = rows, cols, n_head
        self.matvec, self.matmul = fmt.matvec, fmt.matmul

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [T, H, cols] -> [T, H, rows]: head h through its own matrix."""
        T = x.shape[0]
        out = np.empty((T, self.n_head, self.rows), dtype=np.float32)
        if T == 1:
            for h in range(self.n_head):
                self.matvec(self.w[h], x[0, h], out[0, h])
        else:
            oh = np.empty((T, self.rows), dtype=np.float32)
            for h in range(self.n_head):
                self.matmul(self.w[h], np.ascontiguousarray(x[:, h]), oh)
                out[:, h] = oh
        return out


class LegacyKVB:
    """attn_kv_b of older GGUFs (ggml [C, H*(Kn+V)]), used in the absorbed form: the per-head
    k_b and v_b are dequantized once per forward call, by absorb, for absorb and expand (memory
    stays that of the file; llama.cpp runs such files as plain MHA with a full K/V cache)."""

    def __init__(self, gf: GGUFFile, name: str, C: int, H: int, Kn: int, V: int):
        info = gf.info(name)
        if tuple(info.shape) != (C, H * (Kn + V)):
            raise ModelError(f"{gf.path}: tensor {name} has shape {list(info.shape)}, expected {[C, H * (Kn + V)]}")
        self.fmt = get_format(info.qtype, name)
        self.w = gf.raw(name)  # [H*(Kn+V), row_bytes]
        self.C, self.H, self.Kn, self.V = C, H, Kn, V
        self._kvb = None

    def _dense(self) -> np.ndarray:
        out = np.empty((self.w.shape[0], self.C), dtype=np.float32)
        self.fmt.dequantize_rows(self.w, np.arange(self.w.shape[0], dtype=np.int64), out)
        return out.reshape(self.H, self.Kn + self.V, self.C)  # [H, Kn+V, C]

    def absorb(self, q_nope: np.ndarray) -> np.ndarray:
        """[T, H, Kn] -> [T, H, C]"""
        self._kvb = self._dense()  # [H, Kn+V, C], kept for expand
        return np.einsum("thn,hnc->thc", q_nope, self._kvb[:, : self.Kn]).astype(np.float32)

    def expand(self, lat: np.ndarray) -> np.ndarray:
        """[T, H, C] -> [T, H, V]"""
        vb, self._kvb = self._kvb[:, self.Kn :], None  # [H, V, C]
        return np.einsum("thc,hvc->thv", lat, vb).astype(np.float32)


class MLACache:
    """Per layer: the normed latent c [N, C] and the rotated shared rope key [N, R], float32."""

    def __init__(self, n_layer: int, n_ctx: int, C: int, R: int):
        self.n_ctx = n_ctx
        # np.zeros maps untouched pages lazily: memory is used as the context fills.
        self.lat = [np.zeros((n_ctx, C), dtype=np.float32) for _ in range(n_layer)]
        self.pe = [np.zeros((n_ctx, R), dtype=np.float32) for _ in range(n_layer)]

    @property
    def bytes_per_token(self) -> int:
        return sum(a[0].nbytes + b[0].nbytes for a, b in zip(self.lat, self.pe))


class Block:
    def __init__(self, gf: GGUFFile, cfg: ModelConfig, il: int, d: dict, mlp):
        p = f"blk.{il}"
        D, H, C, R, Kn, V, K = cfg.n_embd, cfg.n_head, d["C"], d["R"], d["Kn"], d["V"], d["Kn"] + d["R"]
        self.attn_norm = f32_vector(gf, f"{p}.attn_norm.weight", D)  # [D]
        if f"{p}.attn_q_a.weight" in gf:
            qr = gf.info(f"{p}.attn_q_a.weight").shape[1]
            self.wq_a = Linear(gf, f"{p}.attn_q_a.weight", (D, qr))  # [Qr, D]
            self.q_a_norm = f32_vector(gf, f"{p}.attn_q_a_norm.weight", qr)  # [Qr]
            self.wq = Linear(gf, f"{p}.attn_q_b.weight", (qr, H * K))  # [H*K, Qr]
        else:  # no q LoRA (V2-Lite)
            self.wq_a = self.q_a_norm = None
            self.wq = Linear(gf, f"{p}.attn_q.weight", (D, H * K))  # [H*K, D]
        self.wkv_a = Linear(gf, f"{p}.attn_kv_a_mqa.weight", (D, C + R))  # [C+R, D]
        self.kv_a_norm = f32_vector(gf, f"{p}.attn_kv_a_norm.weight", C)  # [C]
        if f"{p}.attn_k_b.weight" in gf:
            self.k_b = PerHead(gf, f"{p}.attn_k_b.weight", Kn, C, H)  # [H][C, Kn]: q_nope -> q_lat
            self.v_b = PerHead(gf, f"{p}.attn_v_b.weight", C, V, H)  # [H][V, C]: latent -> value
            self.kv_b = None
        else:
            self.k_b = self.v_b = None
            self.kv_b = LegacyKVB(gf, f"{p}.attn_kv_b.weight", C, H, Kn, V)
        self.wo = Linear(gf, f"{p}.attn_output.weight", (H * V, D))  # [D, H*V]
        self.ffn_norm = f32_vector(gf, f"{p}.ffn_norm.weight", D)  # [D]
        self.mlp = mlp


class DeepSeek2Model:
    """Weights as views of the file, an MLA latent cache, and a batched forward pass."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, n_ctx: int, store=None):
        arch, md = cfg.arch, gf.metadata
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.store = store
        D, H = cfg.n_embd, cfg.n_head
        C = int(md.get(f"{arch}.attention.kv_lora_rank", 0) or 0)
        R = cfg.n_rot
        K = int(md.get(f"{arch}.attention.key_length_mla", 0) or 0) or cfg.head_dim
        V = int(md.get(f"{arch}.attention.value_length_mla", 0) or 0) or cfg.head_dim_v
        if C <= 0 or R % 2 or not 0 < R < K:
            raise ModelError(f"{gf.path}: inconsistent MLA sizes: kv_lora_rank {C}, rope {R}, q-k head {K}")
        self.dims = dict(C=C, R=R, Kn=K - R, V=V)
        n_nextn = int(md.get(f"{arch}.nextn_predict_layers", 0) or 0)  # MTP blocks are not run
        n_layer = cfg.n_layer - n_nextn
        self.n_dense = int(md.get(f"{arch}.leading_dense_block_count", 0) or 0)
        self.tok_embd = Embedding(gf, "token_embd.weight", D)
        self.n_vocab = self.tok_embd.n_vocab
        self.output_norm = f32_vector(gf, "output_norm.weight", D)
        out_name = "output.weight" if "output.weight" in gf else "token_embd.weight"  # tied embeddings
        self.output = Linear(gf, out_name, (D, self.n_vocab))  # [V, D]
        self.inv_freq, _ = rope_inv_freq(cfg)  # YaRN frequencies; magnitude and kq scale below
        self.rope_mag, self.kq_scale = mla_scales(cfg, md, K)
        self.blocks = [Block(gf, cfg, il, self.dims, self._mlp(gf, cfg, il)) for il in range(n_layer)]
        self.cache = MLACache(n_layer, n_ctx, C, R)

    def _mlp(self, gf: GGUFFile, cfg: ModelConfig, il: int):
        if f"blk.{il}.ffn_gate_inp.weight" in gf:
            if il < self.n_dense:
                raise ModelError(f"{gf.path}: layer {il} has experts but leading_dense_block_count is {self.n_dense}")
            return MoEMLP(gf, cfg, f"blk.{il}", store=self.store)
        return DenseMLP(gf, f"blk.{il}", cfg.n_embd, cfg.n_ff)

    @property
    def full_kv_bytes_per_token(self) -> int:
        """What a cache of per-head keys and values (float32) would take, for comparison."""
        d = self.dims
        return len(self.blocks) * self.cfg.n_head * (d["Kn"] + d["R"] + d["V"]) * 4

    def _attention(self, blk: Block, h: np.ndarray, il: int, pos0: int) -> np.ndarray:
        cfg, d = self.cfg, self.dims
        T = h.shape[0]
        H, C, R, Kn, V = cfg.n_head, d["C"], d["R"], d["Kn"], d["V"]
        if blk.wq_a is not None:
            qa = blk.wq_a(h)  # [T, Qr]
            ops.rmsnorm(qa, blk.q_a_norm, cfg.norm_eps, qa)
            q = blk.wq(qa).reshape(T, H, Kn + R)
        else:
            q = blk.wq(h).reshape(T, H, Kn + R)
        kv = blk.wkv_a(h)  # [T, C+R]
        lat = np.empty((T, C), dtype=np.float32)
        ops.rmsnorm(np.ascontiguousarray(kv[:, :C]), blk.kv_a_norm, cfg.norm_eps, lat)
        k_pe = np.ascontiguousarray(kv[:, C:]).reshape(T, 1, R)
        q_pe = np.ascontiguousarray(q[:, :, Kn:])  # [T, H, R]
        positions = np.arange(pos0, pos0 + T, dtype=np.int64)
        ops.rope(q_pe, positions, self.inv_freq, self.rope_mag, False)
        ops.rope(k_pe, positions, self.inv_freq, self.rope_mag, False)
        lc, pc = self.cache.lat[il], self.cache.pe[il]
        lc[pos0 : pos0 + T] = lat
        pc[pos0 : pos0 + T] = k_pe[:, 0]
        q_nope = np.ascontiguousarray(q[:, :, :Kn])  # [T, H, Kn]
        q_lat = blk.k_b(q_nope) if blk.k_b is not None else blk.kv_b.absorb(q_nope)  # [T, H, C]
        o_lat = np.empty((T, H, C), dtype=np.float32)
        ops_ext.mla_attention(q_lat, q_pe, lc, pc, pos0, np.float32(self.kq_scale), o_lat)
        o = blk.v_b(o_lat) if blk.v_b is not None else blk.kv_b.expand(o_lat)  # [T, H, V]
        return blk.wo(o.reshape(T, H * V))

    def forward(self, ids: np.ndarray, pos0: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens ``ids`` at positions pos0.. through the model, filling the latent cache.

        Returns logits [T, n_vocab] if all_logits else [1, n_vocab] for the last token.
        """
        cfg = self.cfg
        T = len(ids)
        if pos0 + T > self.n_ctx:
            raise ModelError(f"positions {pos0}..{pos0 + T - 1} do not fit the context of {self.n_ctx}")
        x = self.tok_embd(ids)  # [T, D]
        h = np.empty_like(x)  # [T, D]
        for il, blk in enumerate(self.blocks):
            ops.rmsnorm(x, blk.attn_norm, cfg.norm_eps, h)
            ops.add_inplace(x, self._attention(blk, h, il, pos0))
            ops.rmsnorm(x, blk.ffn_norm, cfg.norm_eps, h)
            blk.mlp(h, out=x)
        if not all_logits:
            x = x[T - 1 :]
        ops.rmsnorm(x, self.output_norm, cfg.norm_eps, h[: x.shape[0]])
        return self.output(h[: x.shape[0]])  # [T or 1, n_vocab]
