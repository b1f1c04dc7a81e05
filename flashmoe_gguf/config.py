"""Model hyper-parameters from GGUF metadata keys (never from file names)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from .errors import ModelError

# RoPE pair ordering per architecture, as llama.cpp applies it: "norm" rotates adjacent pairs
# (x[2i], x[2i+1]) — llama's converter permutes Q/K rows for that — and "neox" rotates
# (x[i], x[i + n_rot/2]).
ROPE_NEOX_ARCHS = frozenset(
    {"qwen", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "olmoe", "olmo2", "phi2", "phi3", "gemma",
     "gemma2", "gemma3", "stablelm", "starcoder2", "gptneox", "falcon", "dbrx", "gpt-oss",
     "qwen35", "qwen35moe"}
)


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int  # D: hidden size
    n_ff: int  # F: dense MLP width
    n_head: int  # H
    n_head_kv: int  # Hkv
    head_dim: int  # per-head size of q and k
    head_dim_v: int  # per-head size of v
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float
    n_rot: int  # rotated dimensions per head
    rope_neox: bool
    rope_scaling: str  # "none" | "linear" | "yarn"
    rope_scale: float  # context scaling factor (1.0 = none)
    rope_orig_ctx: int
    n_expert: int = 0  # E
    n_expert_used: int = 0  # A: experts per token
    n_ff_exp: int = 0  # expert MLP width
    n_ff_shexp: int = 0  # shared expert width
    expert_weights_norm: bool = False
    expert_weights_scale: float = 1.0
    expert_gating: str = "softmax"  # "softmax" | "sigmoid"

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], source: str = "") -> "ModelConfig":
        where = f"{source}: " if source else ""
        arch = md.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelError(f"{where}metadata key general.architecture is missing")

        def get(key: str, default: Any = None, required: bool = False) -> Any:
            full = f"{arch}.{key}"
            if full not in md:
                if required:
                    raise ModelError(f"{where}metadata key {full} is missing")
                return default
            v = md[full]
            if isinstance(v, (list, np.ndarray)):  # per-layer arrays: accept when uniform
                arr = np.asarray(v)
                if arr.size == 0 or not np.all(arr == arr.flat[0]):
                    raise ModelError(f"{where}per-layer values of {full} are not supported")
                v = arr.flat[0].item()
            return v

        n_embd = int(get("embedding_length", required=True))
        n_head = int(get("attention.head_count", required=True))
        if n_head <= 0 or n_embd <= 0:
            raise ModelError(f"{where}invalid sizes: embedding_length={n_embd} head_count={n_head}")
        head_dim = int(get("attention.key_length", n_embd // n_head))
        tokens = md.get("tokenizer.ggml.tokens")
        n_vocab = int(get("vocab_size", len(tokens) if tokens is not None else 0))
        scaling = str(get("rope.scaling.type", "none"))
        factor = float(get("rope.scaling.factor", 1.0) or 1.0)
        gating_id = int(get("expert_gating_func", 0) or 0)  # llama.cpp: 1 softmax, 2 sigmoid
        return cls(
            arch=arch,
            n_layer=int(get("block_count", required=True)),
            n_embd=n_embd,
            n_ff=int(get("feed_forward_length", 0)),
            n_head=n_head,
            n_head_kv=int(get("attention.head_count_kv", n_head)),
            head_dim=head_dim,
            head_dim_v=int(get("attention.value_length", head_dim)),
            n_vocab=n_vocab,
            n_ctx_train=int(get("context_length", 2048)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            n_rot=int(get("rope.dimension_count", head_dim)),
            rope_neox=arch in ROPE_NEOX_ARCHS,
            rope_scaling=scaling,
            rope_scale=factor,
            rope_orig_ctx=int(get("rope.scaling.original_context_length", 0) or 0),
            n_expert=int(get("expert_count", 0) or 0),
            n_expert_used=int(get("expert_used_count", 0) or 0),
            n_ff_exp=int(get("expert_feed_forward_length", 0) or 0),
            n_ff_shexp=int(get("expert_shared_feed_forward_length", 0) or 0),
            expert_weights_norm=bool(get("expert_weights_norm", False)),
            expert_weights_scale=float(get("expert_weights_scale", 1.0) or 1.0),
            expert_gating="sigmoid" if gating_id == 2 else "softmax",
        )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
