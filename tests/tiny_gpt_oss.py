"""Tiny random GptOssForCausalLM models written as GGUF (``gpt-oss``) the way llama.cpp's
converter lays them out (test side only; the oracle is transformers' float32 forward pass).

Layout facts of llama.cpp's GptOssModel conversion (checked against its convert_hf_to_gguf.py on
the same tiny checkpoint: the same names, shapes and values):
- metadata: the common keys (no rope.dimension_count: it defaults to key_length = head_dim),
  rope.scaling.{type=yarn, factor, original_context_length, yarn_beta_fast, yarn_beta_slow},
  attention.sliding_window, expert_feed_forward_length = intermediate_size.
- experts.gate_up_proj [E, D, 2F] has gate and up interleaved along its last axis (gate = even,
  up = odd): transposed and split into ffn_gate_exps / ffn_up_exps (numpy [E, F, D]); its bias
  [E, 2F] likewise into ffn_gate_exps.bias / ffn_up_exps.bias; down_proj [E, F, D] ->
  ffn_down_exps (numpy [E, D, F]) and down_proj_bias -> ffn_down_exps.bias.
- self_attn.sinks -> attn_sinks.weight; mlp.router -> ffn_gate_inp (.weight, .bias);
  post_attention_layernorm -> post_attention_norm; q/k/v/o projections with their biases.
- Real checkpoints ship the experts in MXFP4 (``*_blocks``/``*_scales``), which the converter
  repacks into ggml's MXFP4 blocks unchanged; ``mxfp4_experts=True`` writes the expert weights
  in MXFP4 (use ``round_experts_to_mxfp4`` first so that the oracle holds the same values).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tiny_gguf import add_byte_level_vocab

MXFP4 = gguf.GGMLQuantizationType.MXFP4


def _to_mxfp4_grid(w: np.ndarray) -> np.ndarray:
    """The nearest MXFP4 values, blocks of 32 along the last axis."""
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), MXFP4), MXFP4)


def round_experts_to_mxfp4(hf_model) -> None:
    """Round the expert weights of an HF gpt-oss model, in place, to values MXFP4 represents
    exactly (in the GGUF layout, where the blocks run along each row's input dimension)."""
    import torch

    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]
                w = p.detach().float().numpy().transpose(0, 2, 1)  # [E, out, in]
                p.copy_(torch.from_numpy(np.ascontiguousarray(_to_mxfp4_grid(w).transpose(0, 2, 1))))


def write_gpt_oss_gguf(hf_model, path: str | Path, mxfp4_experts: bool = False,
                       chat_template: str | None = None) -> Path:
    cfg = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    rope = dict(cfg.rope_parameters)

    w = gguf.GGUFWriter(str(path), "gpt-oss")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", 32.0))
        w.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", 1.0))
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    add_byte_level_vocab(w, cfg.vocab_size)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def put(name: str, arr: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    def put_experts(name: str, arr: np.ndarray) -> None:
        if mxfp4_experts:
            data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), MXFP4)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=MXFP4)
        else:
            put(name, arr)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        put(f"{b}.attn_norm.weight", sd[f"{p}.input_layernorm.weight"])
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            put(f"{b}.{gg}.weight", sd[f"{a}.{hf}.weight"])
            put(f"{b}.{gg}.bias", sd[f"{a}.{hf}.bias"])
        put(f"{b}.attn_sinks.weight", sd[f"{a}.sinks"])
        put(f"{b}.post_attention_norm.weight", sd[f"{p}.post_attention_layernorm.weight"])
        put(f"{b}.ffn_gate_inp.weight", sd[f"{m}.router.weight"])
        put(f"{b}.ffn_gate_inp.bias", sd[f"{m}.router.bias"])
        gate_up = sd[f"{m}.experts.gate_up_proj"].transpose(0, 2, 1)  # [E, 2F, D], rows interleaved
        gate_up_b = sd[f"{m}.experts.gate_up_proj_bias"]  # [E, 2F]
        put_experts(f"{b}.ffn_gate_exps.weight", gate_up[:, ::2])
        put_experts(f"{b}.ffn_up_exps.weight", gate_up[:, 1::2])
        put(f"{b}.ffn_gate_exps.bias", gate_up_b[:, ::2])
        put(f"{b}.ffn_up_exps.bias", gate_up_b[:, 1::2])
        put_experts(f"{b}.ffn_down_exps.weight", sd[f"{m}.experts.down_proj"].transpose(0, 2, 1))  # [E, D, F]
        put(f"{b}.ffn_down_exps.bias", sd[f"{m}.experts.down_proj_bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
