"""MoE decoders (mixtral, qwen2moe, qwen3moe, olmoe) against transformers on tiny random models."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flashmoe_gguf import Model  # noqa: E402
from tiny_gguf import write_decoder_gguf  # noqa: E402

VOCAB = 300

# (HF class prefix, GGUF architecture, extra config): router settings as the real models ship them
CASES = {
    "mixtral": ("Mixtral", "llama", dict(num_local_experts=8)),
    "qwen2moe": ("Qwen2Moe", "qwen2moe", dict(num_experts=8, moe_intermediate_size=48,
                                              shared_expert_intermediate_size=80, norm_topk_prob=False)),
    "qwen3moe": ("Qwen3Moe", "qwen3moe", dict(num_experts=8, moe_intermediate_size=48, head_dim=24,
                                              norm_topk_prob=True)),
    "olmoe": ("Olmoe", "olmoe", dict(num_experts=8, norm_topk_prob=False)),
}


def _hf_moe(case: str, seed: int = 0):
    prefix, arch, extra = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        num_experts_per_tok=3, bos_token_id=None, eos_token_id=None, pad_token_id=None, **extra)
    model = getattr(transformers, prefix + "ForCausalLM")(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
            elif name.endswith("mlp.gate.weight"):  # a decisive router, so that top-k is not a near-tie
                p.copy_(torch.randn_like(p))
    return model.eval(), arch


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_logits_match_transformers(tmp_path, case):
    hf, arch = _hf_moe(case)
    model = Model.load(write_decoder_gguf(hf, tmp_path / f"{case}.gguf", arch), n_batch=16)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=32)
    with torch.no_grad():
        ref = hf(torch.tensor(ids[None])).logits[0].float().numpy()
    ours = model.logits(ids)  # prefill path: tokens grouped by expert
    diff = float(np.max(np.abs(ours - ref)) / ref.std())
    print(f"{case}: max |diff| / std = {diff:.2e}")
    assert diff <= 1e-3
    # decode path: one token at a time through the KV cache
    net = model.net
    steps = [net.forward(ids[:8], 0)[0]] + [net.forward(ids[p : p + 1], p)[0] for p in range(8, 20)]
    diff = float(np.max(np.abs(np.stack(steps) - ref[7:20])) / ref.std())
    assert diff <= 1e-3
