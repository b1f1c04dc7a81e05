"""Qwen3.5 checkpoints (``Qwen3_5MoeForCausalLM``, ``Qwen3_5ForCausalLM`` and the text part of their
``...ForConditionalGeneration`` forms) as llama.cpp's ``qwen35moe`` / ``qwen35``.

Layout (as llama.cpp's convert_hf_to_gguf.py writes it):
* RMSNorm weights are stored zero-centred (the model multiplies by 1 + w): +1 on every one except
  the DeltaNet's gated norm ``linear_attn.norm`` (computed in float32 here).
* Gated DeltaNet layers: in_proj_qkv -> attn_qkv, in_proj_z -> attn_gate, in_proj_b -> ssm_beta,
  in_proj_a -> ssm_alpha, A_log -> ssm_a = -exp(A_log), dt_bias -> ssm_dt.bias, conv1d.weight
  [C, 1, W] -> ssm_conv1d.weight [C, W], norm -> ssm_norm, out_proj -> ssm_out. With more value
  heads than key heads, value heads go from grouped order (the value heads of key head 0 first) to
  tiled order, in every tensor indexed by value head (v rows of attn_qkv and ssm_conv1d, attn_gate,
  ssm_beta, ssm_alpha, ssm_a, ssm_dt, ssm_out columns).
* Gated full attention: q_proj (per head: its query rows, then its gate rows) is attn_q unchanged.
* MoE: fused (``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]) or per-expert tensors become
  ffn_{gate,up,down}_exps; the shared expert ffn_*_shexp, its gate [1, D] ffn_gate_inp_shexp.
* The vision tower (``model.visual.*``) and the multi-token-prediction head (``mtp.*``) are skipped.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from .errors import ConvertError
from .parts import ArrayPart, ColPermuted, Part, RowPermuted
from .plan import TensorPlan
from .safetensors_io import SafetensorsIndex, STensor
from .source import Source, recorder
from .vocab import add_vocab

# HF architecture -> (GGUF architecture, MoE)
ARCHITECTURES = {
    "Qwen3_5MoeForCausalLM": ("qwen35moe", True),
    "Qwen3_5MoeForConditionalGeneration": ("qwen35moe", True),
    "Qwen3_5ForCausalLM": ("qwen35", False),
    "Qwen3_5ForConditionalGeneration": ("qwen35", False),
}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")

_PLAIN = {  # per-layer HF suffix -> (GGUF suffix, +1)
    "input_layernorm.weight": ("attn_norm.weight", True),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", True),
    "self_attn.q_proj.weight": ("attn_q.weight", False),
    "self_attn.k_proj.weight": ("attn_k.weight", False),
    "self_attn.v_proj.weight": ("attn_v.weight", False),
    "self_attn.o_proj.weight": ("attn_output.weight", False),
    "self_attn.q_norm.weight": ("attn_q_norm.weight", True),
    "self_attn.k_norm.weight": ("attn_k_norm.weight", True),
    "linear_attn.norm.weight": ("ssm_norm.weight", False),
    "mlp.gate.weight": ("ffn_gate_inp.weight", False),
    "mlp.shared_expert.gate_proj.weight": ("ffn_gate_shexp.weight", False),
    "mlp.shared_expert.up_proj.weight": ("ffn_up_shexp.weight", False),
    "mlp.shared_expert.down_proj.weight": ("ffn_down_shexp.weight", False),
    "mlp.shared_expert_gate.weight": ("ffn_gate_inp_shexp.weight", False),
    "mlp.gate_proj.weight": ("ffn_gate.weight", False),
    "mlp.up_proj.weight": ("ffn_up.weight", False),
    "mlp.down_proj.weight": ("ffn_down.weight", False),
}


def full_attention_interval(layer_types: list[str], path: Path) -> int:
    """llama.cpp's period: layer i is full attention iff (i + 1) % interval == 0 (the per-layer
    flags are written too; its loader prefers those)."""
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    interval = full[0] + 1 if full else len(layer_types) + 1
    if [(i + 1) % interval == 0 for i in range(len(layer_types))] != [t == "full_attention" for t in layer_types]:
        print(f"{path}: layer types are not periodic; full_attention_interval {interval} is only a hint, "
              "the per-layer flags are exact", file=sys.stderr)
    return interval


def value_head_order(n_k: int, n_v: int, d: int) -> np.ndarray:
    """Index of the tiled order: out[j, i] = in[i, j] over [Hk, Hv/Hk, d] (identity when Hv == Hk)."""
    idx = np.arange(n_v * d)
    if n_v == n_k:
        return idx
    return idx.reshape(n_k, n_v // n_k, d).swapaxes(0, 1).reshape(-1)


def open_qwen35(folder: Path, cfg: dict[str, Any], hf_arch: str, part: Callable[..., ArrayPart],
                add_model_card: Callable) -> Source:
    arch, moe = ARCHITECTURES[hf_arch]
    cfg_path = folder / "config.json"

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ConvertError(f"{cfg_path}: {key} is missing")
        return cfg[key]

    n_layer, n_embd = int(need("num_hidden_layers")), int(need("hidden_size"))
    n_head = int(need("num_attention_heads"))
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    n_k, n_v = int(need("linear_num_key_heads")), int(need("linear_num_value_heads"))
    dk, dv = int(need("linear_key_head_dim")), int(need("linear_value_head_dim"))
    if n_v % n_k:
        raise ConvertError(f"{cfg_path}: linear_num_value_heads {n_v} is not a multiple of "
                           f"linear_num_key_heads {n_k}")
    layer_types = cfg.get("layer_types")
    if not layer_types:
        interval = int(cfg.get("full_attention_interval", 4))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layer)]
    if len(layer_types) != n_layer or set(layer_types) - {"full_attention", "linear_attention"}:
        raise ConvertError(f"{cfg_path}: layer_types does not list {n_layer} full/linear attention layers")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    sections = list(rope.get("mrope_section") or [11, 11, 10])
    n_vocab = cfg.get("vocab_size")
    n_ff = int(cfg.get("intermediate_size") or 0)

    w = recorder(arch)
    w.add_type(gguf.GGUFType.MODEL)
    add_model_card(w, folder)
    w.add_block_count(n_layer)
    if cfg.get("max_position_embeddings") is not None:
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(n_embd)
    if not moe:
        w.add_feed_forward_length(int(need("intermediate_size")))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_rope_dimension_count(int(head_dim * partial))
    w.add_rope_dimension_sections((sections + [0] * 4)[:4])
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if moe:
        w.add_expert_count(int(need("num_experts")))
        w.add_expert_used_count(int(need("num_experts_per_tok")))
        w.add_expert_feed_forward_length(int(need("moe_intermediate_size")))
        w.add_expert_shared_feed_forward_length(int(need("shared_expert_intermediate_size")))
    w.add_ssm_conv_kernel(int(need("linear_conv_kernel_dim")))
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(n_k)
    w.add_ssm_time_step_rank(n_v)
    w.add_ssm_inner_size(dv * n_v)
    w.add_array(f"{arch}.attention.recurrent_layers", [t == "linear_attention" for t in layer_types])
    w.add_full_attention_interval(full_attention_interval(layer_types, cfg_path))
    w.add_file_type(0)  # set once the tensor types are chosen
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, folder, "bpe", int(n_vocab) if n_vocab is not None else None)

    src = Source(str(folder), arch, dict(w.kv_data[0]), [], n_layer=n_layer, n_head=n_head,
                 n_head_kv=n_head_kv, n_embd=n_embd, n_ff=n_ff, kind="hf")
    index = SafetensorsIndex(folder)
    tied = bool(cfg.get("tie_word_embeddings", False))
    src.plan = _tensors(index, part, n_layer, n_k, n_v, dk, dv, int(cfg.get("num_experts") or 0), tied)
    return src


def _floats(st: STensor, part: Callable[..., ArrayPart]) -> np.ndarray:
    p = part(st)
    a = p.floats(slice(None))
    p.release()
    return a.reshape(st.shape) if st.shape else a.reshape(1)


def _tensors(index: SafetensorsIndex, part: Callable[..., ArrayPart], n_layer: int, n_k: int, n_v: int,
             dk: int, dv: int, n_expert: int, tied: bool) -> list[TensorPlan]:
    plans: dict[str, TensorPlan] = {}
    experts: dict[str, dict[int, STensor]] = {}
    skipped: set[str] = set()
    v_rows = value_head_order(n_k, n_v, dv)
    v_heads = value_head_order(n_k, n_v, 1)
    nqk = 2 * n_k * dk

    def add(name: str, shape: tuple[int, ...], parts: list[Part]) -> None:
        t = TensorPlan(name, shape, parts)
        t.check()
        plans[name] = t

    def computed(name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        add(name, arr.shape, [ArrayPart(arr.reshape(-1, arr.shape[-1]), None)])

    for hf, st in index.tensors.items():
        if hf.startswith("model.language_model."):
            hf = "model." + hf[len("model.language_model."):]
        elif hf.startswith(("model.visual.", "visual.")):
            skipped.add("vision tower")
            continue
        if hf.startswith(("mtp.", "model.mtp.")):
            skipped.add("multi-token prediction head")
            continue
        if hf.endswith(".rotary_emb.inv_freq"):
            continue
        if st.dtype not in ("F32", "F16", "BF16"):
            raise ConvertError(f"{st.file.path}: tensor {hf} has dtype {st.dtype}; only F32, F16 and BF16 "
                               "checkpoints can be converted")
        shape = tuple(st.shape)
        if hf == "model.embed_tokens.weight":
            add("token_embd.weight", shape, [part(st)])
            continue
        if hf == "lm_head.weight":
            if not tied:
                add("output.weight", shape, [part(st)])
            continue
        if hf == "model.norm.weight":
            computed("output_norm.weight", _floats(st, part) + 1)
            continue
        m = _LAYER_RE.match(hf)
        if not m or int(m.group(1)) >= n_layer:
            raise ConvertError(f"{index.folder}: tensor {hf} has no GGUF name for qwen35")
        b, key = f"blk.{m.group(1)}", m.group(2)
        if key in _PLAIN:
            sfx, plus_one = _PLAIN[key]
            if plus_one:
                computed(f"{b}.{sfx}", _floats(st, part) + 1)
            else:
                add(f"{b}.{sfx}", shape, [part(st)])
        elif key == "linear_attn.in_proj_qkv.weight":
            if shape[0] != nqk + n_v * dv:
                raise ConvertError(f"{index.folder}: tensor {hf} has {shape[0]} rows, config.json implies "
                                   f"{nqk + n_v * dv}")
            add(f"{b}.attn_qkv.weight", shape, [RowPermuted(part(st), np.concatenate([np.arange(nqk), nqk + v_rows]))])
        elif key == "linear_attn.in_proj_z.weight":
            add(f"{b}.attn_gate.weight", shape, [RowPermuted(part(st), v_rows)])
        elif key in ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"):
            sfx = "ssm_beta" if "in_proj_b" in key else "ssm_alpha"
            add(f"{b}.{sfx}.weight", shape, [RowPermuted(part(st), v_heads)])
        elif key == "linear_attn.A_log":
            computed(f"{b}.ssm_a", -np.exp(_floats(st, part).reshape(-1)[v_heads]))
        elif key == "linear_attn.dt_bias":
            computed(f"{b}.ssm_dt.bias", _floats(st, part).reshape(-1)[v_heads])
        elif key == "linear_attn.conv1d.weight":
            conv = _floats(st, part).reshape(shape[0], -1)  # [C, 1, W] -> [C, W]
            computed(f"{b}.ssm_conv1d.weight", np.concatenate([conv[:nqk], conv[nqk:][v_rows]]))
        elif key == "linear_attn.out_proj.weight":
            add(f"{b}.ssm_out.weight", shape, [ColPermuted(part(st), v_rows, unit=dv)])
        elif key in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            if len(shape) != 3:
                raise ConvertError(f"{index.folder}: tensor {hf} has shape {list(shape)}, expected 3-D")
            arr = st.array()
            E = shape[0]
            if key.endswith("down_proj"):
                add(f"{b}.ffn_down_exps.weight", shape, [part(st, arr[e]) for e in range(E)])
            else:
                F = shape[1] // 2
                for sfx, sl in (("gate", slice(0, F)), ("up", slice(F, 2 * F))):
                    add(f"{b}.ffn_{sfx}_exps.weight", (E, F, shape[2]), [part(st, arr[e, sl]) for e in range(E)])
        elif (me := _EXPERT_RE.match(key)):
            experts.setdefault(f"{b}.ffn_{me.group(2)}_exps.weight", {})[int(me.group(1))] = st
        else:
            raise ConvertError(f"{index.folder}: tensor {hf} has no GGUF name for qwen35")

    for name, by_id in experts.items():
        n = n_expert or len(by_id)
        if sorted(by_id) != list(range(n)):
            raise ConvertError(f"{index.folder}: {name}: expert tensors missing or extra "
                               f"(config.json says {n} experts, found {len(by_id)})")
        first = by_id[0].shape
        if any(by_id[i].shape != first for i in range(n)):
            raise ConvertError(f"{index.folder}: {name}: experts of different shapes")
        add(name, (n, *first), [part(by_id[i]) for i in range(n)])

    for what in sorted(skipped):
        print(f"{index.folder}: skipping the {what} (text model only)", file=sys.stderr)
    for t in plans.values():
        natives = {p.native for p in t.parts}
        t.source_qtype = natives.pop() if len(natives) == 1 else None

    def order(t: TensorPlan) -> tuple:
        m = re.match(r"^blk\.(\d+)\.", t.name)
        if m:
            return (1, int(m.group(1)), t.name)
        return (0 if t.name.startswith("token_embd") else 2, 0, t.name)

    return sorted(plans.values(), key=order)
