"""deepseek2 (DeepSeek-V2/V3, Kimi-K2): tiny random DeepseekV3ForCausalLM checkpoints written in
llama.cpp's layout, against transformers' float32 logits (prefill in batches, then 20 decode
steps over the latent cache); the router against transformers' own; the latent cache size; the
same GGUF in llama.cpp (when llama-cpp-python is installed); the DeepSeek-V3.1 chat template."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flashmoe_gguf import Model  # noqa: E402
from flashmoe_gguf.arch.deepseek2 import MLACache  # noqa: E402
from flashmoe_gguf.chat_template import render  # noqa: E402
from tiny_deepseek import write_deepseek2_gguf  # noqa: E402

VOCAB = 300
DATA = Path(__file__).parent / "data" / "chat_templates"

# v3: q LoRA, 4 expert groups of which 2 are used, mscale_all_dim 1 (DeepSeek-V3's settings);
# lite: no q LoRA, mscale = mscale_all_dim = 0.707 (DeepSeek-V2-Lite's), attn_kv_b unsplit as
# older converters wrote it (checks the legacy layout and the YaRN log multiplier at once).
CASES = {"v3": dict(lite=False, legacy=False), "lite-legacy": dict(lite=True, legacy=True)}


def _hf_deepseek(lite: bool, seed: int = 0):
    torch.manual_seed(seed)
    mscale = 0.707 if lite else 1.0
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=None if lite else 24, qk_rope_head_dim=8,
        v_head_dim=12, qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=3,
        first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=163840, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_interleave=True,
        # YaRN as DeepSeek-V3 ships it: with 8 rotary dims, pairs 1..2 fall inside the ramp
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                         "mscale": mscale, "mscale_all_dim": mscale},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # away from 1 so that a swapped or missing norm shows
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif p.ndim >= 2:  # unit-scale activations; a decisive router (top-k not a near-tie)
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * (3.0 if name.endswith("mlp.gate.weight") else 1.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # large enough to change the selection
                b.copy_(torch.randn_like(b) * 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    case = CASES[request.param]
    hf = _hf_deepseek(case["lite"])
    path = write_deepseek2_gguf(hf, tmp_path_factory.mktemp("ds2") / f"{request.param}.gguf", legacy=case["legacy"])
    ids = np.random.default_rng(1).integers(0, VOCAB, size=40)
    with torch.no_grad():
        ref = hf(torch.tensor(ids[None])).logits[0].float().numpy()  # [40, V]
    return request.param, hf, Model.load(path, n_batch=16), ids, ref


def _diff(a, ref):
    return float(np.max(np.abs(a - ref)) / ref.std())


def test_prefill_then_decode_match_transformers(pair):
    case, _, model, ids, ref = pair
    assert model.config.arch == "deepseek2"
    d = _diff(model.logits(ids), ref)  # prefill in batches of 16, 16, 8
    print(f"{case}: prefill max |diff| / std = {d:.2e}")
    assert d <= 1e-3
    net = model.net
    steps = [net.forward(ids[:20], 0)[0]] + [net.forward(ids[p : p + 1], p)[0] for p in range(20, 40)]
    d = _diff(np.stack(steps), ref[19:40])
    print(f"{case}: 20 decode steps max |diff| / std = {d:.2e}")
    assert d <= 1e-3


def test_router_matches_transformers(pair):
    """Selection (sigmoid + correction bias, best 2 of 4 groups) and weights (unbiased,
    renormalized, x2.5) of each MoE layer against transformers' router on the same inputs."""
    _, hf, model, _, _ = pair
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    n_moe = 0
    for il, blk in enumerate(model.net.blocks):
        if not hasattr(blk.mlp, "route"):
            continue
        n_moe += 1
        with torch.no_grad():
            _, w_ref, sel_ref = hf.model.layers[il].mlp.gate(x)
        sel, w = blk.mlp.route(x.numpy())
        order = np.argsort(sel, axis=1)
        ref_order = np.argsort(sel_ref.numpy(), axis=1)
        assert np.array_equal(np.take_along_axis(sel, order, 1), np.take_along_axis(sel_ref.numpy(), ref_order, 1))
        np.testing.assert_allclose(np.take_along_axis(w, order, 1),
                                   np.take_along_axis(w_ref.numpy(), ref_order, 1), rtol=1e-5, atol=1e-6)
    assert n_moe == 2  # the first layer is dense


def test_latent_cache_is_what_is_stored(pair):
    """The cache holds the latent and the rope key per token and layer, not per-head K/V."""
    _, _, model, ids, _ = pair
    net = model.net
    L, C, R = 3, 32, 8
    assert net.cache.bytes_per_token == L * (C + R) * 4
    assert net.full_kv_bytes_per_token == L * 4 * (16 + 8 + 12) * 4  # H * (Kn + R + V) floats
    # DeepSeek-V3's sizes: 61 layers, 128 heads, C 512, R 64, Kn 128, V 128
    v3 = MLACache(61, 2, 512, 64).bytes_per_token
    full = 61 * 128 * (128 + 64 + 128) * 4
    print(f"DeepSeek-V3 float32 cache per token: latent {v3} B, full K/V {full} B ({full / v3:.0f}x)")
    assert v3 == 140544
    assert [a.shape for a in net.cache.lat] == [(model.n_ctx, C)] * L
    assert [a.shape for a in net.cache.pe] == [(model.n_ctx, R)] * L


def test_logits_match_llama_cpp(pair):
    """llama.cpp (llama-cpp-python, F32 KV cache) on the same GGUF. llama.cpp recognizes a model
    without q LoRA only by its layer count (27, 26 or 48), so the tiny "lite" file is not for it."""
    llama_cpp = pytest.importorskip("llama_cpp")
    case, _, model, ids, ref = pair
    if case.startswith("lite"):
        pytest.skip("llama.cpp needs q_lora_rank unless the layer count is a known lite model's")
    llm = llama_cpp.Llama(str(model.file.path), n_ctx=256, n_batch=64, n_ubatch=64, logits_all=True,
                          verbose=False, n_threads=2, type_k=0, type_v=0)  # 0 = GGML_TYPE_F32
    llm.eval(ids[:20].tolist())
    for p in range(20, 40):
        llm.eval([int(ids[p])])
    theirs = np.array(llm.scores[:40], dtype=np.float32)
    d = _diff(model.logits(ids), theirs)
    print(f"{case}: vs llama.cpp max |diff|/std {d:.2e} (llama.cpp vs transformers {_diff(theirs, ref):.2e})")
    assert d <= 1e-3


def test_deepseek_chat_template():
    """DeepSeek-V3.1's template renders in our sandbox as transformers renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (DATA / "deepseek-v3.1.jinja").read_text()
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "<think>greet</think>Hello!"}, {"role": "user", "content": "2+2?"}]
    bos = "<｜begin▁of▁sentence｜>"
    for thinking in (False, True):
        ours = render(template, msgs, add_generation_prompt=True, bos_token=bos, thinking=thinking)
        ref = render_jinja_template([msgs], chat_template=template, add_generation_prompt=True, bos_token=bos,
                                    thinking=thinking)[0]
        assert ours == (ref[0] if isinstance(ref, list) else ref)
    assert ours == (bos + "You are terse.<｜User｜>Hi there<｜Assistant｜><think></think>Hello!<｜end▁of▁sentence｜>"
                    "<｜User｜>2+2?<｜Assistant｜><think>")
