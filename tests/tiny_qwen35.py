"""Tiny random Qwen3.5 / Qwen3.5-MoE Hugging Face models written as GGUF the way llama.cpp's
converter lays them out (test side only; the oracle is transformers' float32 forward pass).

Layout facts of llama.cpp's converter for these architectures:
- RMSNorm weights (input/post-attention layernorm, final norm, q/k norm) get +1: Hugging Face
  stores them zero-centred and multiplies by (1 + w); the DeltaNet's own gated norm is stored as is.
- linear_attn.A_log -> ssm_a = -exp(A_log); dt_bias -> ssm_dt.bias; conv1d.weight [C, 1, W] ->
  ssm_conv1d.weight [C, W]; in_proj_qkv -> attn_qkv; in_proj_z -> attn_gate; in_proj_b -> ssm_beta;
  in_proj_a -> ssm_alpha; norm -> ssm_norm; out_proj -> ssm_out.
- When there are more value heads than key heads, the value heads are reordered from grouped
  (value heads of key head 0 first) to tiled order (value head j*Hk + i is the j-th value head of
  key head i), in every tensor indexed by value head: the v rows of attn_qkv and of ssm_conv1d,
  attn_gate rows, ssm_beta/ssm_alpha rows, ssm_a, ssm_dt, ssm_out columns.
- Full-attention q_proj ([q_h | gate_h] per head) is stored unchanged as attn_q.
- post_attention_layernorm is blk.N.post_attention_norm; the expert tensors as for qwen3moe.
Checked once against llama.cpp's own convert_hf_to_gguf.py on the same tiny checkpoints: the same
tensor names, shapes, types and values (ssm_a to float rounding of -exp).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tiny_gguf import add_byte_level_vocab


def tiled_heads(w: np.ndarray, axis: int, n_k: int, n_v: int, head_dim: int) -> np.ndarray:
    """Reorder value heads along ``axis`` from grouped-by-key-head to tiled order."""
    w = np.moveaxis(w, axis, 0)
    rest = w.shape[1:]
    r = w.reshape(n_k, n_v // n_k, head_dim, *rest).swapaxes(0, 1).reshape(n_v * head_dim, *rest)
    return np.ascontiguousarray(np.moveaxis(r, 0, axis))


def full_attention_interval(layer_types: list[str]) -> int:
    """llama.cpp only knows a period: layer i is full attention iff (i + 1) % interval == 0."""
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    interval = full[0] + 1 if full else len(layer_types) + 1
    expect = [(i + 1) % interval == 0 for i in range(len(layer_types))]
    if expect != [t == "full_attention" for t in layer_types]:
        raise ValueError(f"layer types {layer_types} are not periodic")
    return interval


def write_qwen35_gguf(hf_model, path: str | Path, qtype=gguf.GGMLQuantizationType.F32) -> Path:
    """Write a Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM (float weights) as qwen35 / qwen35moe."""
    cfg = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    moe = any(".mlp.experts." in k for k in sd)
    arch = "qwen35moe" if moe else "qwen35"
    n_k, n_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    head_dim = cfg.head_dim
    rope = cfg.rope_parameters
    n_rot = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    sections = list(rope.get("mrope_section", [11, 11, 10]))

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    if not moe:
        w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_rope_dimension_count(n_rot)
    w.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(n_k)
    w.add_ssm_time_step_rank(n_v)
    w.add_ssm_inner_size(dv * n_v)
    # llama.cpp's converter writes the per-layer flags (which its loader prefers) and the interval
    w.add_array(f"{arch}.attention.recurrent_layers", [t == "linear_attention" for t in cfg.layer_types])
    w.add_full_attention_interval(full_attention_interval(cfg.layer_types))
    w.add_vocab_size(cfg.vocab_size)
    add_byte_level_vocab(w, cfg.vocab_size)

    def put(name: str, arr: np.ndarray, float_only: bool = False) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if float_only or qtype == gguf.GGMLQuantizationType.F32 or arr.ndim == 1:
            w.add_tensor(name, arr)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    def v_tiled(arr: np.ndarray, axis: int, hd: int) -> np.ndarray:
        return tiled_heads(arr, axis, n_k, n_v, hd) if n_v != n_k else arr

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"] + 1)
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        put(f"{b}.attn_norm.weight", sd[f"{p}.input_layernorm.weight"] + 1)
        put(f"{b}.post_attention_norm.weight", sd[f"{p}.post_attention_layernorm.weight"] + 1)
        if cfg.layer_types[i] == "linear_attention":
            la = f"{p}.linear_attn"
            qkv = sd[f"{la}.in_proj_qkv.weight"]  # [2*Hk*Dk + Hv*Dv, D]
            nqk = 2 * n_k * dk
            put(f"{b}.attn_qkv.weight", np.concatenate([qkv[:nqk], v_tiled(qkv[nqk:], 0, dv)]))
            put(f"{b}.attn_gate.weight", v_tiled(sd[f"{la}.in_proj_z.weight"], 0, dv))
            put(f"{b}.ssm_beta.weight", v_tiled(sd[f"{la}.in_proj_b.weight"], 0, 1))
            put(f"{b}.ssm_alpha.weight", v_tiled(sd[f"{la}.in_proj_a.weight"], 0, 1))
            put(f"{b}.ssm_a", v_tiled(-np.exp(sd[f"{la}.A_log"]), 0, 1))
            put(f"{b}.ssm_dt.bias", v_tiled(sd[f"{la}.dt_bias"], 0, 1))
            conv = sd[f"{la}.conv1d.weight"][:, 0, :]  # [C, W]
            put(f"{b}.ssm_conv1d.weight", np.concatenate([conv[:nqk], v_tiled(conv[nqk:], 0, dv)]), float_only=True)
            put(f"{b}.ssm_norm.weight", sd[f"{la}.norm.weight"])
            put(f"{b}.ssm_out.weight", v_tiled(sd[f"{la}.out_proj.weight"], 1, dv))
        else:
            sa = f"{p}.self_attn"
            put(f"{b}.attn_q.weight", sd[f"{sa}.q_proj.weight"])
            put(f"{b}.attn_k.weight", sd[f"{sa}.k_proj.weight"])
            put(f"{b}.attn_v.weight", sd[f"{sa}.v_proj.weight"])
            put(f"{b}.attn_output.weight", sd[f"{sa}.o_proj.weight"])
            put(f"{b}.attn_q_norm.weight", sd[f"{sa}.q_norm.weight"] + 1)
            put(f"{b}.attn_k_norm.weight", sd[f"{sa}.k_norm.weight"] + 1)
        if moe:
            gate_up = sd[f"{p}.mlp.experts.gate_up_proj"]  # [E, 2F, D]
            F = gate_up.shape[1] // 2
            put(f"{b}.ffn_gate_inp.weight", sd[f"{p}.mlp.gate.weight"], float_only=True)  # [E, D]
            put(f"{b}.ffn_gate_exps.weight", gate_up[:, :F])  # [E, F, D]
            put(f"{b}.ffn_up_exps.weight", gate_up[:, F:])  # [E, F, D]
            put(f"{b}.ffn_down_exps.weight", sd[f"{p}.mlp.experts.down_proj"])  # [E, D, F]
            put(f"{b}.ffn_gate_shexp.weight", sd[f"{p}.mlp.shared_expert.gate_proj.weight"])
            put(f"{b}.ffn_up_shexp.weight", sd[f"{p}.mlp.shared_expert.up_proj.weight"])
            put(f"{b}.ffn_down_shexp.weight", sd[f"{p}.mlp.shared_expert.down_proj.weight"])
            put(f"{b}.ffn_gate_inp_shexp.weight", sd[f"{p}.mlp.shared_expert_gate.weight"], float_only=True)  # [1, D]
        else:
            put(f"{b}.ffn_gate.weight", sd[f"{p}.mlp.gate_proj.weight"])
            put(f"{b}.ffn_up.weight", sd[f"{p}.mlp.up_proj.weight"])
            put(f"{b}.ffn_down.weight", sd[f"{p}.mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
