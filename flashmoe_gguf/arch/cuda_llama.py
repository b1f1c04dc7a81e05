"""The llama family on a CUDA GPU (numba.cuda): the weights of an already built ``LlamaModel``
uploaded once in their block format, the KV cache in GPU memory, the forward pass on the GPU.

Dense MLPs run on the GPU. A MoE block's MLP (router, routed and shared experts) runs on the CPU
from the page cache (``hybrid``): the normalized hidden state goes to the host, the MoE output
comes back. Everything else (attention, norms, dense layers, logits) stays on the GPU.
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .layers import Linear
from .llama import DenseMLP, LlamaModel


def _kernels():
    from numba import cuda

    from ..kernels.cuda import get_format, ops
    return cuda, get_format, ops


class _GLinear:
    """A Linear whose raw block bytes (and bias) live on the GPU."""

    def __init__(self, lin: Linear, uploaded: dict):
        cuda, get_format, _ = _kernels()
        self.rows, self.cols = lin.rows, lin.cols
        self.fmt = get_format(lin.qtype, lin.name)
        key = id(lin.w)
        if key not in uploaded:  # tied embeddings: one copy
            uploaded[key] = cuda.to_device(np.ascontiguousarray(lin.w))
        self.w = uploaded[key]
        self.bias = None if lin.bias is None else cuda.to_device(np.ascontiguousarray(lin.bias, np.float32))
        self.n_bytes = lin.w.nbytes
        self._out: dict = {}  # output buffer per batch size (each product runs once per forward)

    def __call__(self, x, out=None):
        """x [T, cols] device f32 -> [T, rows] device f32"""
        cuda, _, ops = _kernels()
        T = x.shape[0]
        if out is None:
            out = self._out.get(T)
            if out is None:
                out = self._out[T] = cuda.device_array((T, self.rows), np.float32)
        if T == 1:
            self.fmt.matvec(self.w, x[0], out[0])
        else:
            self.fmt.matmul(self.w, x, out)
        if self.bias is not None:
            ops.add_bias(out, self.bias)
        return out


class CudaLlama:
    """Same interface as LlamaModel (``forward(ids, pos0, all_logits)``), computing on the GPU."""

    def __init__(self, net: LlamaModel, hybrid: bool = False):
        cuda, get_format, ops = _kernels()
        self.cpu = net
        self.cfg = cfg = net.cfg
        self.n_ctx, self.n_vocab, self.store, self.cache = net.n_ctx, net.n_vocab, net.store, net.cache
        up: dict = {}
        emb = net.tok_embd
        self.emb_fmt = get_format(emb.fmt.qtype, "token_embd.weight")
        up[id(emb.w)] = self.emb = cuda.to_device(np.ascontiguousarray(emb.w))
        self.output_norm = cuda.to_device(net.output_norm)
        self.output = _GLinear(net.output, up)
        self.inv_freq = cuda.to_device(net.inv_freq)
        self.attn_factor, self.scale = net.attn_factor, net.scale
        self.layers = []
        self.host_mlp = 0
        for blk in net.blocks:
            L = dict(attn_norm=cuda.to_device(blk.attn_norm), ffn_norm=cuda.to_device(blk.ffn_norm),
                     wq=_GLinear(blk.wq, up), wk=_GLinear(blk.wk, up), wv=_GLinear(blk.wv, up),
                     wo=_GLinear(blk.wo, up),
                     q_norm=None if blk.q_norm is None else cuda.to_device(blk.q_norm),
                     k_norm=None if blk.k_norm is None else cuda.to_device(blk.k_norm))
            if isinstance(blk.mlp, DenseMLP):
                L["mlp"] = (_GLinear(blk.mlp.gate, up), _GLinear(blk.mlp.up, up), _GLinear(blk.mlp.down, up))
            elif hybrid:
                L["mlp"] = blk.mlp  # computed on the CPU
                self.host_mlp += 1
            else:
                raise ModelError("device cuda: expert MLPs run on the CPU only; use --device hybrid")
            self.layers.append(L)
        Hkv, K, V = cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v
        self.kc = [cuda.device_array((self.n_ctx, Hkv, K), np.float32) for _ in self.layers]
        self.vc = [cuda.device_array((self.n_ctx, Hkv, V), np.float32) for _ in self.layers]
        self.weight_bytes = sum(a.nbytes for a in up.values())

    def forward(self, ids: np.ndarray, pos0: int, all_logits: bool = False) -> np.ndarray:
        cuda, _, ops = _kernels()
        cfg = self.cfg
        T = len(ids)
        H, Hkv, K, V, D = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v, cfg.n_embd
        eps = cfg.norm_eps
        positions = cuda.to_device(np.arange(pos0, pos0 + T, dtype=np.int64))
        x = cuda.device_array((T, D), np.float32)
        self.emb_fmt.dequantize_rows(self.emb, cuda.to_device(np.asarray(ids, np.int64)), x)
        h = cuda.device_array((T, D), np.float32)
        attn = cuda.device_array((T, H, V), np.float32)
        for il, L in enumerate(self.layers):
            ops.rmsnorm(x, L["attn_norm"], eps, h)
            q = L["wq"](h).reshape(T, H, K)
            k = L["wk"](h).reshape(T, Hkv, K)
            v = L["wv"](h).reshape(T, Hkv, V)
            for t, w, nh in ((q, L["q_norm"], H), (k, L["k_norm"], Hkv)):
                if w is not None:
                    flat = t.reshape(T * nh, K) if w.shape[0] == K else t.reshape(T, nh * K)
                    ops.rmsnorm(flat, w, eps, flat)
            ops.rope(q, positions, self.inv_freq, self.attn_factor, cfg.rope_neox)
            ops.rope(k, positions, self.inv_freq, self.attn_factor, cfg.rope_neox)
            ops.store_kv(self.kc[il], self.vc[il], k, v, pos0)
            ops.attention(q, self.kc[il], self.vc[il], pos0, self.scale, attn)
            ops.add_inplace(x, L["wo"](attn.reshape(T, H * V)))
            ops.rmsnorm(x, L["ffn_norm"], eps, h)
            mlp = L["mlp"]
            if isinstance(mlp, tuple):
                g = mlp[0](h)
                ops.silu_mul(g, mlp[1](h))
                ops.add_inplace(x, mlp[2](g))
            else:  # hybrid: the MoE block on the CPU
                ops.add_inplace(x, cuda.to_device(mlp(h.copy_to_host())))
        if not all_logits:
            x = x[T - 1:]
        n = x.shape[0]
        ops.rmsnorm(x, self.output_norm, eps, h[:n])
        return self.output(h[:n]).copy_to_host()
