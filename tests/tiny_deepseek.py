"""Tiny random DeepseekV3ForCausalLM models written as GGUF (``deepseek2``) the way llama.cpp's
converter lays them out (test side only; the oracle is transformers' float32 forward pass).

Layout facts of llama.cpp's DeepseekV2Model conversion:
- metadata: head_count_kv = 1 (MLA runs as MQA over the latent), key_length = kv_lora_rank +
  qk_rope_head_dim, value_length = kv_lora_rank, key_length_mla = qk_nope + qk_rope,
  value_length_mla = v_head_dim, rope.dimension_count = qk_rope_head_dim,
  leading_dense_block_count = first_k_dense_replace, expert_group_count / _used_count = n_group /
  topk_group, expert_gating_func = 2 for scoring_func "sigmoid", expert_weights_scale =
  routed_scaling_factor, expert_weights_norm = norm_topk_prob, rope.scaling.* from the YaRN
  parameters with yarn_log_multiplier = 0.1 * mscale_all_dim.
- kv_b_proj [H*(Kn+V), C] is split per head: attn_k_b = k_b transposed (numpy [H, C, Kn]) and
  attn_v_b = v_b (numpy [H, V, C]); older converters wrote attn_kv_b unsplit (``legacy=True``,
  with key_length = Kn + R, value_length = V, head_count_kv = H and no *_mla keys).
- q_a_proj/q_a_layernorm/q_b_proj -> attn_q_a/attn_q_a_norm/attn_q_b (q_proj -> attn_q without a
  q LoRA); kv_a_proj_with_mqa -> attn_kv_a_mqa; kv_a_layernorm -> attn_kv_a_norm;
  mlp.gate.e_score_correction_bias -> exp_probs_b.bias; shared_experts -> *_shexp.
- No RoPE permutation: DeepSeek rotates adjacent pairs (rope_interleave), as llama.cpp's
  "norm" RoPE does.
Checked once against llama.cpp's convert_hf_to_gguf.py on the same tiny checkpoint (with
scoring_func "sigmoid" in its config.json, as DeepSeek-V3's has): the same tensors, byte for byte,
and the same metadata.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tiny_gguf import add_byte_level_vocab


def write_deepseek2_gguf(hf_model, path: str | Path, legacy: bool = False, chat_template: str | None = None) -> Path:
    cfg = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Kn, V = cfg.qk_nope_head_dim, cfg.v_head_dim
    rope = dict(cfg.rope_parameters)

    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.n_group:
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(C)
    if legacy:
        w.add_head_count_kv(H)
        w.add_key_length(Kn + R)
        w.add_value_length(V)
    else:
        w.add_head_count_kv(1)
        w.add_key_length(C + R)
        w.add_value_length(C)
        w.add_key_length_mla(Kn + R)
        w.add_value_length_mla(V)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(R)
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        if rope.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    add_byte_level_vocab(w, cfg.vocab_size)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def put(name: str, arr: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        a = f"{p}.self_attn"
        put(f"{b}.attn_norm.weight", sd[f"{p}.input_layernorm.weight"])
        if f"{a}.q_a_proj.weight" in sd:
            put(f"{b}.attn_q_a.weight", sd[f"{a}.q_a_proj.weight"])
            put(f"{b}.attn_q_a_norm.weight", sd[f"{a}.q_a_layernorm.weight"])
            put(f"{b}.attn_q_b.weight", sd[f"{a}.q_b_proj.weight"])
        else:
            put(f"{b}.attn_q.weight", sd[f"{a}.q_proj.weight"])
        put(f"{b}.attn_kv_a_mqa.weight", sd[f"{a}.kv_a_proj_with_mqa.weight"])
        put(f"{b}.attn_kv_a_norm.weight", sd[f"{a}.kv_a_layernorm.weight"])
        kv_b = sd[f"{a}.kv_b_proj.weight"]  # [H*(Kn+V), C]
        if legacy:
            put(f"{b}.attn_kv_b.weight", kv_b)
        else:
            kv_b = kv_b.reshape(H, Kn + V, C)
            put(f"{b}.attn_k_b.weight", kv_b[:, :Kn].transpose(0, 2, 1))  # [H, C, Kn]
            put(f"{b}.attn_v_b.weight", kv_b[:, Kn:])  # [H, V, C]
        put(f"{b}.attn_output.weight", sd[f"{a}.o_proj.weight"])
        put(f"{b}.ffn_norm.weight", sd[f"{p}.post_attention_layernorm.weight"])
        m = f"{p}.mlp"
        if f"{m}.experts.gate_up_proj" in sd:
            gate_up = sd[f"{m}.experts.gate_up_proj"]  # [E, 2F, D]
            F = gate_up.shape[1] // 2
            put(f"{b}.ffn_gate_inp.weight", sd[f"{m}.gate.weight"])
            put(f"{b}.exp_probs_b.bias", sd[f"{m}.gate.e_score_correction_bias"])
            put(f"{b}.ffn_gate_exps.weight", gate_up[:, :F])
            put(f"{b}.ffn_up_exps.weight", gate_up[:, F:])
            put(f"{b}.ffn_down_exps.weight", sd[f"{m}.experts.down_proj"])
            put(f"{b}.ffn_gate_shexp.weight", sd[f"{m}.shared_experts.gate_proj.weight"])
            put(f"{b}.ffn_up_shexp.weight", sd[f"{m}.shared_experts.up_proj.weight"])
            put(f"{b}.ffn_down_shexp.weight", sd[f"{m}.shared_experts.down_proj.weight"])
        else:
            put(f"{b}.ffn_gate.weight", sd[f"{m}.gate_proj.weight"])
            put(f"{b}.ffn_up.weight", sd[f"{m}.up_proj.weight"])
            put(f"{b}.ffn_down.weight", sd[f"{m}.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
