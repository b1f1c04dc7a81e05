"""The MoE feed-forward block shared by the MoE architectures (mixtral = llama with experts,
qwen2moe, qwen3moe, olmoe, qwen35moe, deepseek2, gpt-oss).

Letters: T = tokens, D = hidden size, E = experts, A = experts used per token, F = expert width.
Experts are stored as llama.cpp's 3-D tensors ``blk.N.ffn_{gate,up,down}_exps`` (numpy order
``[E, rows, row_bytes]``): expert ``e`` is one contiguous byte range ``w[e]`` of the mapping, so
only the routed experts' pages are ever touched.

Routing as llama.cpp's build_moe_ffn: router logits (+ router bias) -> probabilities by the gating
function (softmax, sigmoid, or "softmax_weight": the logits themselves, softmaxed over the selected
experts only, gpt-oss) -> selection scores = probabilities + the score-correction bias
``exp_probs_b`` when present (DeepSeek-V3; the weights stay unbiased) -> with expert groups, only
the ``expert_group_used_count`` groups whose two best selection scores sum highest stay eligible
-> top-A -> weights, renormalized (sum clamped at 2**-14) and scaled as the metadata says.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from ..config import ModelConfig
from ..errors import ModelError
from ..gguf_file import GGUFFile
from ..kernels import get_format
from ..kernels.cpu import ops, ops_ext
from .layers import Linear

# Whether the top-k weights are renormalized to sum to 1, per architecture, where the metadata
# does not say (llama.cpp's choices for the same architectures).
_NORM_TOPK = {"llama": True, "mistral": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}

# gpt-oss's clamped SwiGLU (llama.cpp's LLM_FFN_SWIGLU_OAI_MOE constants)
OAI_ALPHA = np.float32(1.702)
OAI_LIMIT = np.float32(7.0)


def float_tensor(gf: GGUFFile, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """An optional small tensor (bias, norm) as float32 of numpy shape ``shape``, or None if
    absent: a view of the file when it is F32, else dequantized (an F16 converter output stores
    2-D biases such as gpt-oss's per-expert ones in F16)."""
    if name not in gf:
        return None
    info = gf.info(name)
    if tuple(reversed(info.shape)) != shape:
        raise ModelError(f"{gf.path}: tensor {name} has shape {list(info.shape)}, expected {list(reversed(shape))}")
    if info.qtype == GGMLQuantizationType.F32:
        return gf.float_view(name)
    raw = gf.raw(name).reshape(-1, gf.raw(name).shape[-1])  # [rows, row_bytes]
    out = np.empty((raw.shape[0], info.shape[0]), dtype=np.float32)
    get_format(info.qtype, name).dequantize_rows(raw, np.arange(raw.shape[0], dtype=np.int64), out)
    return out.reshape(shape)


class ExpertTensor:
    """One 3-D expert tensor: E matrices of [rows, cols] in one block format."""

    def __init__(self, gf: GGUFFile, name: str, cols: int, rows: int, n_expert: int):
        info = gf.info(name)
        if tuple(info.shape) != (cols, rows, n_expert):
            raise ModelError(f"{gf.path}: tensor {name} has shape {list(info.shape)}, expected {[cols, rows, n_expert]}")
        fmt = get_format(info.qtype, name)
        self.name = name
        self.qtype = info.qtype
        self.rows, self.cols = rows, cols
        self.w = gf.raw(name)  # [E, rows, row_bytes] u8
        self.matvec = fmt.matvec
        self.matmul = fmt.matmul
        self.matvec_ids = fmt.matvec_ids  # the grouped product of several experts, or None
        self.file_index = info.file_index
        self.offset = info.offset  # absolute offset of expert 0 in its file
        self.expert_bytes = self.w[0].nbytes

    def __call__(self, e: int, x: np.ndarray, many: bool = False) -> np.ndarray:
        """x [T, cols] -> [T, rows] through expert e. ``many``: x is part of a several-token batch
        (a prompt whose tokens are grouped by expert): the prompt kernel even for one row, as the
        GPU's grouped product takes it for every row of a prompt (their float32 results agree)."""
        T = x.shape[0]
        out = np.empty((T, self.rows), dtype=np.float32)
        if T == 1 and not many:
            self.matvec(self.w[e], x[0], out[0])
        else:
            self.matmul(self.w[e], x, out)
        return out


class MoEMLP:
    """router -> top-A experts -> weighted sum of SwiGLU experts (+ gated shared expert)."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, prefix: str, store=None):
        D, E, F = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp or cfg.n_ff
        if cfg.n_expert_used <= 0 or cfg.n_expert_used > E:
            raise ModelError(f"{gf.path}: expert_used_count {cfg.n_expert_used} is not in 1..{E}")
        self.layer = int(prefix.split(".")[1])
        self.router = Linear(gf, f"{prefix}.ffn_gate_inp.weight", (D, E), bias=f"{prefix}.ffn_gate_inp.bias")  # [E, D]
        self.gate = ExpertTensor(gf, f"{prefix}.ffn_gate_exps.weight", D, F, E)  # [E, F, D]
        self.up = ExpertTensor(gf, f"{prefix}.ffn_up_exps.weight", D, F, E)  # [E, F, D]
        self.down = ExpertTensor(gf, f"{prefix}.ffn_down_exps.weight", F, D, E)  # [E, D, F]
        self.n_expert = E
        self.n_used = cfg.n_expert_used
        md_norm = gf.metadata.get(f"{cfg.arch}.expert_weights_norm")
        self.norm_topk = bool(md_norm) if md_norm is not None else _NORM_TOPK.get(cfg.arch, False)
        self.scale = cfg.expert_weights_scale
        self.gating = cfg.expert_gating  # "softmax" | "sigmoid" | "softmax_weight"
        self.act = "silu"  # "silu" | "swiglu_oai" (gpt-oss)
        # optional per-expert biases (gpt-oss): [E, F], [E, F], [E, D]
        self.gate_b = float_tensor(gf, f"{prefix}.ffn_gate_exps.bias", (E, F))
        self.up_b = float_tensor(gf, f"{prefix}.ffn_up_exps.bias", (E, F))
        self.down_b = float_tensor(gf, f"{prefix}.ffn_down_exps.bias", (E, D))
        # DeepSeek-V3's score-correction bias: added to the scores that select, not to the weights
        self.sel_bias = float_tensor(gf, f"{prefix}.exp_probs_b.bias", (E,))  # [E]
        self.n_group = int(gf.metadata.get(f"{cfg.arch}.expert_group_count", 0) or 0)
        self.n_group_used = int(gf.metadata.get(f"{cfg.arch}.expert_group_used_count", 0) or 0)
        if self.n_group > 1 and (E % self.n_group or not 1 <= self.n_group_used <= self.n_group):
            raise ModelError(f"{gf.path}: {E} experts do not split into {self.n_group} groups "
                             f"of which {self.n_group_used} are used")
        self.store = store
        if store is not None:
            for t in (self.gate, self.up, self.down):
                store.register(t.w)
        self.shared = None
        if f"{prefix}.ffn_gate_shexp.weight" in gf:
            Fs = cfg.n_ff_shexp or gf.info(f"{prefix}.ffn_gate_shexp.weight").shape[1]
            self.shared = (
                Linear(gf, f"{prefix}.ffn_gate_shexp.weight", (D, Fs)),  # [Fs, D]
                Linear(gf, f"{prefix}.ffn_up_shexp.weight", (D, Fs)),  # [Fs, D]
                Linear(gf, f"{prefix}.ffn_down_shexp.weight", (Fs, D)),  # [D, Fs]
            )
        self.shared_gate = None
        name = f"{prefix}.ffn_gate_inp_shexp.weight"
        if name in gf:
            w = gf.float_view(name).reshape(-1)
            if w.shape != (D,):
                raise ModelError(f"{gf.path}: tensor {name} has shape {list(w.shape)}, expected [{D}]")
            self.shared_gate = w  # [D]

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [T, D] -> (experts [T, A] int, weights [T, A] f32)"""
        return self.select(self.router(x))

    def select(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """router logits [T, E] -> (experts [T, A] int, weights [T, A] f32)

        In float64 from the float32 logits, the weights rounded once (the GPU's routing computes
        the same expressions: docs/architecture.md, Numerics); equal scores select the lower
        expert."""
        A = self.n_used
        logits = np.asarray(logits, dtype=np.float64)
        if self.gating == "sigmoid":
            probs = 1.0 / (1.0 + np.exp(-logits))
        elif self.gating == "softmax_weight":
            probs = logits
        else:
            z = logits - logits.max(axis=1, keepdims=True)
            probs = np.exp(z)
            probs /= probs.sum(axis=1, keepdims=True)
        score = probs if self.sel_bias is None else probs + self.sel_bias  # [T, E]
        if self.n_group > 1:
            score = self._group_mask(score, A)
        sel = np.argsort(-score, axis=1, kind="stable")[:, :A]  # [T, A]
        w = np.take_along_axis(probs, sel, axis=1)  # [T, A]
        if self.gating == "softmax_weight":
            w = np.exp(w - w.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
        order = np.argsort(-w, axis=1, kind="stable")
        sel = np.take_along_axis(sel, order, axis=1)
        w = np.take_along_axis(w, order, axis=1)
        if self.norm_topk:
            w = w / np.maximum(w.sum(axis=1, keepdims=True), 6.103515625e-5)
        return sel, (w * self.scale).astype(np.float32)

    def _group_mask(self, score: np.ndarray, A: int) -> np.ndarray:
        """Selection scores with the experts outside the best groups set to -inf: a group scores
        the sum of its two best experts; the best ``n_group_used`` groups stay (more when A
        needs more experts than they hold, e.g. after set_experts_per_token)."""
        T, E = score.shape
        G = self.n_group
        per = E // G
        g = score.reshape(T, G, per)
        top = np.sort(g, axis=2)[:, :, -min(2, per):].sum(axis=2)  # [T, G]
        n_keep = max(self.n_group_used, -(-A // per))
        keep = np.argpartition(-top, n_keep - 1, axis=1)[:, :n_keep]  # [T, n_keep]
        mask = np.full((T, G), -np.inf, dtype=score.dtype)
        np.put_along_axis(mask, keep, 0.0, axis=1)
        return (g + mask[:, :, None]).reshape(T, E)

    def expert(self, e: int, x: np.ndarray, many: bool = False) -> np.ndarray:
        g = self.gate(e, x, many)  # [T, F]
        u = self.up(e, x, many)  # [T, F]
        if self.gate_b is not None:
            g += self.gate_b[e]
        if self.up_b is not None:
            u += self.up_b[e]
        if self.act == "swiglu_oai":
            ops_ext.swiglu_oai(g, u, OAI_ALPHA, OAI_LIMIT)
        else:
            ops.silu_mul(g, u)
        y = self.down(e, g, many)  # [T, D]
        if self.down_b is not None:
            y += self.down_b[e]
        return y

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The block's output for x [T, D]; with ``out`` (the residual stream), added to it: the
        routed experts' sum first, then the shared expert's, each rounded into out as the GPU
        adds them."""
        y = self.routed(x, *self.route(x))
        if out is None:
            out = y
        else:
            out += y
        if self.shared is not None:
            g = self.shared[0](x)
            u = self.shared[1](x)
            ops.silu_mul(g, u)
            y = self.shared[2](g)  # [T, D]
            if self.shared_gate is not None:
                gate = 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ self.shared_gate.astype(np.float64))))
                y = (y.astype(np.float64) * gate[:, None]).astype(np.float32)
            out += y
        return out

    def _grouped(self, futures, used) -> bool:
        """Whether a decode token's experts go through the grouped products: every read done
        (a cold expert is better computed while the others still load), formats that have one,
        SwiGLU without biases."""
        if self.act != "silu" or any(b is not None for b in (self.gate_b, self.up_b, self.down_b)):
            return False
        if any(t.matvec_ids is None for t in (self.gate, self.up, self.down)):
            return False
        return all(futures.get(e) is None or futures[e].done() for e in used.tolist())

    def _routed_grouped(self, x: np.ndarray, sel: np.ndarray, w: np.ndarray, used: np.ndarray) -> np.ndarray:
        """routed() for one token, its experts' products three calls in all (one parallel region
        each instead of one per expert and product): the same numbers as one expert at a time."""
        ids = np.ascontiguousarray(used, dtype=np.int64)
        k = ids.shape[0]
        x = np.ascontiguousarray(x, dtype=np.float32)
        g = np.empty((k, self.gate.rows), np.float32)
        u = np.empty((k, self.up.rows), np.float32)
        self.gate.matvec_ids(self.gate.w, ids, x, g)
        self.up.matvec_ids(self.up.w, ids, x, u)
        ops.silu_mul(g, u)
        y = np.empty((k, self.down.rows), np.float32)
        self.down.matvec_ids(self.down.w, ids, g, y)
        return _token_sum(sel, w, ids, y)

    def routed(self, x: np.ndarray, sel: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The routed experts' weighted sum [T, D] for x [T, D], experts sel and weights w [T, A]."""
        T, D = x.shape
        store = self.store
        used = np.unique(sel)
        # all reads of this layer's experts are issued at once, before any compute
        futures = store.prefetch(self, used) if store is not None else {}
        # experts already resident are computed first; then the others in the order their reads
        # were issued. Their outputs are summed afterwards in expert order, so the float32 sum
        # (and with int8 activations everything after it) does not depend on which reads
        # finished first.
        if T == 1 and self._grouped(futures, used):
            if store is not None:
                for e in used.tolist():
                    store.wait(futures.get(e))  # (all done: a failed read raises here)
            return self._routed_grouped(x, sel, w, used)
        order = sorted(used.tolist(), key=lambda e: futures.get(e) is not None and not futures[e].done())
        ys = {}
        for e in order:
            if store is not None:
                store.wait(futures.get(e))
            if T == 1:
                ys[e] = (None, None, self.expert(e, x))
            else:  # the batch's tokens grouped by expert: each expert's weights are read once
                rows, slot = np.nonzero(sel == e)
                ys[e] = (rows, slot, self.expert(e, np.ascontiguousarray(x[rows]), many=True))  # [n, D]
        return _expert_sum(T, D, sel, w, ys)


def _expert_sum(T: int, D: int, sel: np.ndarray, w: np.ndarray, ys: dict) -> np.ndarray:
    """The routed experts' weighted sum [T, D], in expert order (ascending; whatever order they
    were computed in): ys[e] = (rows, slots, y) for expert e's tokens (one token: None, None)."""
    ids = sorted(ys)
    if T == 1:
        return _token_sum(sel, w, np.array(ids, np.int64), np.concatenate([ys[e][2] for e in ids]))
    out = np.zeros((T, D), dtype=np.float64)  # (float64: exact products, rounded once at the end)
    for e in ids:
        rows, slot, y = ys[e]
        out[rows] += w[rows, slot].astype(np.float64)[:, None] * y.astype(np.float64)
    return out.astype(np.float32)


def _token_sum(sel: np.ndarray, w: np.ndarray, ids: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One token's experts summed [1, D]: y [k, D] the outputs of experts ids (ascending), sel
    and w [1, A] its routing (float64 products and sums, rounded once: ops.expert_sum1)."""
    out = np.empty((1, y.shape[1]), np.float32)
    ops.expert_sum1(np.ascontiguousarray(sel[0]), np.ascontiguousarray(w[0]), ids, np.ascontiguousarray(y), out[0])
    return out
