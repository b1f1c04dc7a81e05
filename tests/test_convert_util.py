"""Tiny Hugging Face checkpoints for the converter tests: random transformers models saved as bf16
safetensors, with a byte-level BPE tokenizer trained here (tokenizers) and a chat template."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts routes every token to a few small networks.",
    "Memory bandwidth bounds the speed of decoding: bytes per token over bytes per second.",
    "Numbers like 12, 345 and 6789 appear in text; so do emojis and accents: café, naïve.",
    "def main():\n    return 42  # the answer\n",
    "She said: 'we'll see', and he didn't reply. They're here; it's late.",
] * 20


def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE PreTrainedTokenizerFast with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


CONFIGS = {
    # hidden 64, MLP 96 (not a multiple of 256 or 64's multiples beyond 32)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=96, rope_theta=10000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(intermediate_size=256, rope_theta=1000000.0,
                                                            sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(intermediate_size=512, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=96, head_dim=24, rope_theta=1000000.0)),
    # MoE: expert widths 256 (mixtral's down rows and qwen3moe's hidden take Q4_K) and others (fallbacks)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=256, num_local_experts=8,
                                                            num_experts_per_tok=3, rope_theta=1000000.0)),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(intermediate_size=96, num_experts=8,
                                                                num_experts_per_tok=3, moe_intermediate_size=64,
                                                                shared_expert_intermediate_size=80,
                                                                norm_topk_prob=False)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(hidden_size=256, intermediate_size=96, num_experts=8,
                                                               num_experts_per_tok=3, moe_intermediate_size=96,
                                                               head_dim=24, norm_topk_prob=True)),
    # llama.cpp writes OLMoE's norm epsilon as 1e-5 whatever config.json says: use that value
    # (OLMoE has no GQA: llama.cpp sizes its k norm by the hidden size)
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=96, num_experts=8, num_experts_per_tok=3,
                                                      norm_topk_prob=False, rms_norm_eps=1e-5, num_key_value_heads=4)),
}


def make_hf_model(folder: Path, arch: str, seed: int = 0, extra_vocab: int = 3, tie: bool = False, **overrides):
    """Save a random tiny model of ``arch`` in ``folder`` (bf16 safetensors + tokenizer); returns
    (float32 transformers model holding exactly the saved bf16 values, tokenizer)."""
    import torch
    import transformers

    tok = train_tokenizer()
    cfg_cls, model_cls, extra = CONFIGS[arch]
    kw = dict(vocab_size=len(tok) + extra_vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tie,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    kw.update(extra)
    kw.update(overrides)
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**kw)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # make them matter
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.copy_(torch.randn_like(p))  # a decisive router: top-k is not a near-tie
            p.copy_(p.to(torch.bfloat16).float())
    save_bf16(model, folder)
    tok.save_pretrained(folder)
    return model.eval(), tok


def save_bf16(model, folder: Path, **kw) -> None:
    """Save a bf16 copy (the float32 model keeps its float32 buffers, e.g. RoPE frequencies)."""
    import copy

    import torch

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, **kw)


def corpus_ids(tok) -> list[int]:
    return tok.encode(" ".join(CORPUS[: len(CORPUS) // 20]), add_special_tokens=False)


def ref_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].float().numpy()


def normalized_maxdiff(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / ref.std())


def mean_kl(ours: np.ndarray, ref: np.ndarray) -> float:
    """Mean over positions of KL(ref || ours) of the softmax distributions."""
    def logsoftmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsoftmax(ref), logsoftmax(ours)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def greedy_ref(model, prompt, n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def greedy_ours(model, prompt, n: int) -> list[int]:
    """Greedy continuation without stopping at end-of-generation tokens (random models emit them)."""
    ids = list(prompt)
    logits = model.logits(ids)[-1]
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        ids.append(t)
        logits = model.net.forward(np.array([t], dtype=np.int64), len(ids) - 1)[0]
    return out


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def write_config(folder: Path, cfg: dict) -> None:
    (folder / "config.json").write_text(json.dumps(cfg))


def greedy_agreement(ours, model, prompt: list[int], n: int = 16) -> tuple[int, list[int]]:
    """Our greedy continuation of ``prompt``, checked against the reference teacher-forced on it
    (one transformers pass over prompt + our tokens). Returns (exact, unexplained): ``exact`` steps
    where our token is the reference's argmax; ``unexplained`` the steps where it is not and the
    reference's preference is larger than the logit error observed at that step (a real
    disagreement, not a near-tie flipped by quantization noise)."""
    toks = greedy_ours(ours, prompt, n)
    full = list(prompt) + toks
    ref = ref_logits(model, full)[len(prompt) - 1 : -1]
    mine = ours.logits(full)[len(prompt) - 1 : -1]
    exact, unexplained = 0, []
    for i, t in enumerate(toks):
        best = int(np.argmax(ref[i]))
        if best == t:
            exact += 1
            continue
        err = float(np.max(np.abs(mine[i] - ref[i])))
        if ref[i][best] - ref[i][t] > 2 * err:
            unexplained.append(i)
    return exact, unexplained
