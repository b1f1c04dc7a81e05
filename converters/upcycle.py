"""Upcycling a dense llama/qwen model into a Mixtral-style MoE (as mergekit-moe users do).

Every expert is the dense MLP with its intermediate neurons permuted in whole ``unit``-wide groups
(256 when the MLP width allows; gate/up rows and the matching down columns), so each expert
computes exactly the dense MLP while holding different bytes, and the router is seeded random.
With the top-k weights renormalised (as Mixtral/llama and qwen3moe do) the MoE computes the dense
model whatever the routing: a test model for the expert machinery, not for routing.

Quantization commutes with the permutation (rows are quantized independently, and a block never
straddles two groups when the block size divides ``unit``), so the dense tensor is encoded once
and each expert is a byte permutation of it: the upcycled model computes exactly what the dense
model computes with its MLP quantized the same way.

Targets: llama (and mistral) -> llama with experts; qwen2 -> llama (q/k rows reordered for
llama's RoPE pairs; q/k/v biases kept); qwen3 -> qwen3moe (llama has no q/k norms).
"""
from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType

from .errors import ConvertError
from .hf import qk_permutation
from .parts import ArrayPart, CachedPart, ColPermuted, RowPermuted
from .plan import TensorPlan
from .source import Source

_TARGET = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3moe"}


def group_unit(n_ff: int) -> int:
    for u in (256, 128, 64, 32):
        if n_ff % u == 0:
            return u
    return 1


def expert_permutations(n_ff: int, n_expert: int, seed: int) -> tuple[list[np.ndarray], int]:
    """Row orders of the E experts (distinct while there are enough orders) and the group width."""
    unit = group_unit(n_ff)
    n_groups = n_ff // unit
    rng = np.random.default_rng(seed)
    distinct = math.factorial(min(n_groups, 20))
    seen: set[tuple[int, ...]] = set()
    out = []
    for _ in range(n_expert):
        for _try in range(1000):
            p = rng.permutation(n_groups)
            if tuple(p) not in seen or len(seen) >= distinct:
                break
        seen.add(tuple(p))
        out.append((p[:, None] * unit + np.arange(unit)).reshape(-1))
    return out, unit


def upcycle(src: Source, n_expert: int, top_k: int, seed: int = 0) -> None:
    if src.arch not in _TARGET:
        raise ConvertError(f"{src.path}: cannot upcycle architecture {src.arch!r} "
                           f"(dense {', '.join(sorted(_TARGET))} only)")
    if any(t.is_expert for t in src.plan):
        raise ConvertError(f"{src.path}: the model has experts already")
    if n_expert < 1 or not 1 <= top_k <= n_expert:
        raise ConvertError(f"--upcycle {n_expert} --top-k {top_k}: need 1 <= top-k <= experts")
    by_name = {t.name: t for t in src.plan}
    D, F = src.n_embd, src.n_ff
    if not D or not F:
        raise ConvertError(f"{src.path}: embedding or feed-forward length is missing")
    perms, unit = expert_permutations(F, n_expert, seed)
    rng = np.random.default_rng([seed, 1])
    target = _TARGET[src.arch]
    new_plan: list[TensorPlan] = []
    for t in src.plan:
        parts = t.parts
        if src.arch == "qwen2" and target == "llama" and any(t.name.endswith(s) for s in (
                "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            heads = src.n_head if ".attn_q." in t.name else src.n_head_kv
            perm = qk_permutation(t.shape[0], heads)
            t.parts = [RowPermuted(parts[0], perm) if len(t.shape) == 2 else ColPermuted(parts[0], perm)]
        if not t.name.endswith(("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")):
            new_plan.append(t)
            continue
        blk = t.name.rsplit(".", 2)[0]  # "blk.N"
        kind = t.name.split(".")[-2]  # ffn_gate | ffn_up | ffn_down
        want = (D, F) if kind == "ffn_down" else (F, D)
        if t.shape != want or len(t.parts) != 1:
            raise ConvertError(f"{src.path}: {t.name} has shape {list(t.shape)}, expected {list(want)}")
        base = CachedPart(t.parts[0], users=n_expert)
        if kind == "ffn_down":
            experts = [ColPermuted(base, p, unit) for p in perms]
        else:
            experts = [RowPermuted(base, p) for p in perms]
        for e in experts:
            e.src_nbytes = base.src_nbytes // n_expert
        if kind == "ffn_gate":
            router = (rng.standard_normal((n_expert, D)) / math.sqrt(D)).astype(np.float32)
            new_plan.append(TensorPlan(f"{blk}.ffn_gate_inp.weight", (n_expert, D), [ArrayPart(router, Q.F32)]))
        new_plan.append(TensorPlan(f"{blk}.{kind}_exps.weight", (n_expert, *t.shape), experts,
                                   source_qtype=t.source_qtype))
    missing = [i for i in range(src.n_layer) if f"blk.{i}.ffn_gate_inp.weight" not in {t.name for t in new_plan}]
    if missing:
        raise ConvertError(f"{src.path}: no dense MLP (ffn_gate/up/down) in layers {missing}")
    src.plan = new_plan
    if target != src.arch:
        head_dim = src.n_embd // src.n_head if src.n_head else 0
        key_len = src.meta.get(f"{src.arch}.attention.key_length")
        src.rename_arch(target)
        if target == "llama" and f"llama.rope.dimension_count" not in src.meta:
            dim = int(key_len.value) if key_len is not None else head_dim
            src.set("llama.rope.dimension_count", dim, GGUFValueType.UINT32)
    a = src.arch
    src.set(f"{a}.expert_count", n_expert, GGUFValueType.UINT32)
    src.set(f"{a}.expert_used_count", top_k, GGUFValueType.UINT32)
    if a == "qwen3moe":
        src.set(f"{a}.expert_feed_forward_length", F, GGUFValueType.UINT32)
    src.info["upcycle"] = {"experts": n_expert, "top_k": top_k, "seed": seed, "unit": unit}
