"""Tiny random Hugging Face models written as GGUF the way llama.cpp's converter lays them out.

Only for tests: the oracle is transformers' float32 forward pass on the same weights. The
layout facts (tensor names, the Q/K row permutation llama.cpp applies to the llama architecture,
metadata keys) come from gguf-py's constants.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import gguf

def byte_level_tokens(n_vocab: int) -> list[str]:
    """A byte-level BPE vocabulary: the 256 byte symbols of GPT-2's mapping, then fillers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for _, c in sorted(zip(bs, cs))]
    assert n_vocab >= 256 + 3
    return symbols + ["ab"] + [f"<tok{i}>" for i in range(n_vocab - 256 - 3)] + ["<s>", "</s>"]


def add_byte_level_vocab(w: gguf.GGUFWriter, n_vocab: int) -> None:
    """A byte-level BPE tokenizer of n_vocab tokens (the last two: BOS, EOS) in the writer's keys."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(byte_level_tokens(n_vocab))
    w.add_token_types([1] * (n_vocab - 2) + [3, 3])
    w.add_token_merges(["a b"])  # one real merge: llama.cpp requires the merges key
    w.add_bos_token_id(n_vocab - 2)
    w.add_eos_token_id(n_vocab - 1)
    w.add_add_bos_token(False)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder rows of q/k from HF's half-split rotary layout to ggml's adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_decoder_gguf(hf_model, path: str | Path, arch: str, qtype=gguf.GGMLQuantizationType.F32) -> Path:
    """Write a llama/qwen2/qwen3 HF model (float weights) as a GGUF of architecture ``arch``."""
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    return write_state_gguf(hf_model.config, sd, path, arch, qtype)


def random_llama_state(seed: int = 0, vocab: int = 300, hidden: int = 64, ff: int = 96, layers: int = 2,
                       heads: int = 4, kv_heads: int = 2, n_expert: int = 0, n_expert_used: int = 2,
                       shared_ff: int = 0):
    """A random llama checkpoint without torch: (config namespace, HF-named numpy state dict).
    With n_expert > 0 it is a mixtral-style MoE (transformers' fused expert layout); with
    shared_ff > 0 each MoE layer also has a gated shared expert of that size (qwen2-moe style)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    hd = hidden // heads
    cfg = SimpleNamespace(vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                          rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, head_dim=hd,
                          num_local_experts=n_expert, num_experts_per_tok=n_expert_used,
                          shared_expert_intermediate_size=shared_ff)
    r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    sd = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": 1 + r(hidden),
          "lm_head.weight": r(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        sd.update({f"{p}.input_layernorm.weight": 1 + r(hidden), f"{p}.post_attention_layernorm.weight": 1 + r(hidden),
                   f"{p}.self_attn.q_proj.weight": r(heads * hd, hidden), f"{p}.self_attn.k_proj.weight": r(kv_heads * hd, hidden),
                   f"{p}.self_attn.v_proj.weight": r(kv_heads * hd, hidden), f"{p}.self_attn.o_proj.weight": r(hidden, heads * hd),
                   })
        if n_expert:
            sd.update({f"{p}.mlp.gate.weight": r(n_expert, hidden) * 10,
                       f"{p}.mlp.experts.gate_up_proj": r(n_expert, 2 * ff, hidden),
                       f"{p}.mlp.experts.down_proj": r(n_expert, hidden, ff)})
            if shared_ff:
                sd.update({f"{p}.mlp.shared_expert.gate_proj.weight": r(shared_ff, hidden),
                           f"{p}.mlp.shared_expert.up_proj.weight": r(shared_ff, hidden),
                           f"{p}.mlp.shared_expert.down_proj.weight": r(hidden, shared_ff),
                           f"{p}.mlp.shared_expert_gate.weight": r(1, hidden)})
        else:
            sd.update({f"{p}.mlp.gate_proj.weight": r(ff, hidden), f"{p}.mlp.up_proj.weight": r(ff, hidden),
                       f"{p}.mlp.down_proj.weight": r(hidden, ff)})
    return cfg, sd


def write_state_gguf(cfg, sd: dict, path: str | Path, arch: str, qtype=gguf.GGMLQuantizationType.F32,
                     skip_keys: tuple[str, ...] = ()) -> Path:
    """Write an HF-named float state dict as a GGUF of architecture ``arch``."""
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w = gguf.GGUFWriter(str(path), arch)
    add_kv = w.add_key_value
    w.add_key_value = lambda k, *a, **kw: None if k in skip_keys else add_kv(k, *a, **kw)  # type: ignore
    w.add_block_count(cfg.num_hidden_layers)
    n_expert = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope_theta = getattr(cfg, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
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

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not getattr(cfg, "tie_word_embeddings", False):
        put("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        q, k = sd[f"{p}.self_attn.q_proj.weight"], sd[f"{p}.self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = llama_permute(q, n_head), llama_permute(k, n_kv)
        put(f"blk.{i}.attn_norm.weight", sd[f"{p}.input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", q)
        put(f"blk.{i}.attn_k.weight", k)
        put(f"blk.{i}.attn_v.weight", sd[f"{p}.self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[f"{p}.self_attn.o_proj.weight"])
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            if f"{p}.self_attn.{hf}.bias" in sd:
                put(f"blk.{i}.{gg}.bias", sd[f"{p}.self_attn.{hf}.bias"])
        if f"{p}.self_attn.q_norm.weight" in sd:
            put(f"blk.{i}.attn_q_norm.weight", sd[f"{p}.self_attn.q_norm.weight"])
            put(f"blk.{i}.attn_k_norm.weight", sd[f"{p}.self_attn.k_norm.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[f"{p}.post_attention_layernorm.weight"])
        if f"{p}.mlp.experts.gate_up_proj" in sd:  # transformers' fused expert layout [E, 2F, D]
            gate_up = sd[f"{p}.mlp.experts.gate_up_proj"]
            F = gate_up.shape[1] // 2
            put(f"blk.{i}.ffn_gate_inp.weight", sd[f"{p}.mlp.gate.weight"], float_only=True)  # [E, D]
            put(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :F])  # [E, F, D]
            put(f"blk.{i}.ffn_up_exps.weight", gate_up[:, F:])  # [E, F, D]
            put(f"blk.{i}.ffn_down_exps.weight", sd[f"{p}.mlp.experts.down_proj"])  # [E, D, F]
            if f"{p}.mlp.shared_expert.gate_proj.weight" in sd:
                put(f"blk.{i}.ffn_gate_shexp.weight", sd[f"{p}.mlp.shared_expert.gate_proj.weight"])
                put(f"blk.{i}.ffn_up_shexp.weight", sd[f"{p}.mlp.shared_expert.up_proj.weight"])
                put(f"blk.{i}.ffn_down_shexp.weight", sd[f"{p}.mlp.shared_expert.down_proj.weight"])
                put(f"blk.{i}.ffn_gate_inp_shexp.weight", sd[f"{p}.mlp.shared_expert_gate.weight"][0], float_only=True)
        else:
            put(f"blk.{i}.ffn_gate.weight", sd[f"{p}.mlp.gate_proj.weight"])
            put(f"blk.{i}.ffn_up.weight", sd[f"{p}.mlp.up_proj.weight"])
            put(f"blk.{i}.ffn_down.weight", sd[f"{p}.mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
