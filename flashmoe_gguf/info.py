"""``flashmoe info``: what a GGUF holds, without computing anything."""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

from .config import ModelConfig
from .gguf_file import GGUFFile


@dataclass(frozen=True)
class ModelFacts:
    arch: str
    name: str
    n_params: int
    n_params_active: int  # per token: everything but the unrouted experts
    file_bytes: int
    expert_bytes: int  # bytes of all routed-expert tensors
    bytes_per_expert: int  # one expert of one layer, gate+up+down
    by_type: dict[str, tuple[int, int]]  # type name -> (tensors, bytes)
    config: ModelConfig


def _is_expert(name: str) -> bool:
    return "_exps." in name


def facts(gf: GGUFFile) -> ModelFacts:
    cfg = ModelConfig.from_metadata(gf.metadata, str(gf.path))
    n_params = n_expert_params = expert_bytes = 0
    per_layer_expert_bytes: dict[str, int] = defaultdict(int)
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in gf:
        n_params += t.n_elements
        by_type[t.qtype.name][0] += 1
        by_type[t.qtype.name][1] += t.n_bytes
        if _is_expert(t.name):
            n_expert_params += t.n_elements
            expert_bytes += t.n_bytes
            per_layer_expert_bytes[t.name.split(".")[1]] += t.n_bytes
    active = n_params
    if cfg.n_expert:
        active = n_params - n_expert_params + n_expert_params * cfg.n_expert_used // cfg.n_expert
    per_expert = 0
    if cfg.n_expert and per_layer_expert_bytes:
        per_expert = max(per_layer_expert_bytes.values()) // cfg.n_expert
    return ModelFacts(
        arch=cfg.arch,
        name=str(gf.metadata.get("general.name", "")),
        n_params=n_params,
        n_params_active=active,
        file_bytes=gf.file_size,
        expert_bytes=expert_bytes,
        bytes_per_expert=per_expert,
        by_type={k: (v[0], v[1]) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1][1])},
        config=cfg,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return str(n)


def describe(path: str | os.PathLike) -> str:
    gf = GGUFFile(path)
    f = facts(gf)
    c = f.config
    lines = [
        f"file:          {gf.path}" + (f" (+{len(gf.paths) - 1} split files)" if len(gf.paths) > 1 else ""),
        f"name:          {f.name or '-'}",
        f"architecture:  {f.arch}",
        f"parameters:    {human_count(f.n_params)} total, {human_count(f.n_params_active)} active per token",
        f"file size:     {human_bytes(f.file_bytes)}",
        f"layers:        {c.n_layer}, hidden {c.n_embd}, heads {c.n_head} (kv {c.n_head_kv}), head size {c.head_dim}",
        f"context:       {c.n_ctx_train} (trained), rope base {c.rope_base:g}, {'neox' if c.rope_neox else 'normal'} ordering"
        + (f", {c.rope_scaling} scaling x{c.rope_scale:g}" if c.rope_scaling not in ("none", "") else ""),
        f"vocabulary:    {c.n_vocab} ({gf.metadata.get('tokenizer.ggml.model', '?')}"
        f", pre {gf.metadata.get('tokenizer.ggml.pre', '-')})",
    ]
    if c.is_moe:
        width = c.n_ff_exp or next((t.shape[1] for t in gf if t.name.endswith("ffn_gate_exps.weight")), 0)
        lines.append(
            f"experts:       {c.n_expert} per layer, {c.n_expert_used} used per token, width {width}, "
            f"gating {c.expert_gating}; {human_bytes(f.bytes_per_expert)} per expert per layer, "
            f"{human_bytes(f.expert_bytes)} in all ({100 * f.expert_bytes / max(f.file_bytes, 1):.1f}% of the file)"
        )
        if c.n_ff_shexp:
            lines.append(f"shared expert: width {c.n_ff_shexp}")
    else:
        lines.append(f"mlp:           dense, width {c.n_ff}")
    lines.append("tensor types:")
    for name, (count, nbytes) in f.by_type.items():
        lines.append(f"  {name:<8} {count:5d} tensors  {human_bytes(nbytes):>10}")
    return "\n".join(lines)
