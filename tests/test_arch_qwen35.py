"""Qwen3.5 (qwen35, qwen35moe): the Gated DeltaNet kernels against a float64 transcription of the
recurrence, and whole models against transformers on tiny random checkpoints with both layer
kinds and more value heads than key heads (so llama.cpp's value-head reordering matters)."""
from __future__ import annotations

import numpy as np
import pytest

from flashmoe_gguf.kernels.cpu import deltanet as dn

VOCAB = 300


def _delta_rule_f64(q, k, v, g, beta, S):
    """o_t = S_t^T q_t with S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T;
    value head h reads key head h % Hk."""
    S = S.astype(np.float64).copy()
    T, Hk, _ = k.shape
    Hv = v.shape[1]
    out = np.zeros(v.shape)
    for t in range(T):
        for h in range(Hv):
            kk, qq = k[t, h % Hk].astype(np.float64), q[t, h % Hk].astype(np.float64)
            s = S[h] * np.exp(np.float64(g[t, h]))
            s += np.outer(kk, (v[t, h] - s.T @ kk) * beta[t, h])
            S[h] = s
            out[t, h] = s.T @ qq
    return out, S


def _dn_inputs(rng, T, Hk, Hv, Dk, Dv):
    q = rng.standard_normal((T, Hk, Dk)).astype(np.float32)
    k = rng.standard_normal((T, Hk, Dk)).astype(np.float32)
    dn.l2norm_heads(q, 1e-6, Dk ** -0.5)
    dn.l2norm_heads(k, 1e-6, 1.0)
    v = rng.standard_normal((T, Hv, Dv)).astype(np.float32)
    g = -rng.uniform(0.0, 3.0, (T, Hv)).astype(np.float32)  # from no decay to strong decay
    beta = rng.uniform(0.0, 1.0, (T, Hv)).astype(np.float32)
    S0 = rng.standard_normal((Hv, Dk, Dv)).astype(np.float32)
    return q, k, v, g, beta, S0


# (T, Hk, Hv, Dk, Dv): vector path (Dv % 16 == 0) with even and odd Dk, scalar path (Dv % 16 != 0),
# more value than key heads, partial and several chunks for the chunked form
SHAPES = [(1, 2, 4, 16, 16), (7, 2, 4, 16, 32), (70, 2, 6, 8, 16), (130, 1, 3, 16, 12), (9, 2, 4, 9, 32),
          (65, 4, 4, 32, 48)]


@pytest.mark.parametrize("shape", SHAPES)
def test_delta_rule_forms_match_recurrence(shape):
    rng = np.random.default_rng(sum(shape))
    q, k, v, g, beta, S0 = _dn_inputs(rng, *shape)
    o_ref, S_ref = _delta_rule_f64(q, k, v, g, beta, S0)
    for name, fn in (("recurrent", dn.delta_rule_recurrent), ("chunked", dn.delta_rule_chunked),
                     ("chunked16", lambda *a: dn.delta_rule_chunked(*a, chunk=16))):
        S = S0.copy()
        out = np.full(v.shape, np.nan, dtype=np.float32)
        fn(q, k, v, g, beta, S, out)
        err_o = float(np.abs(out - o_ref).max())
        err_s = float(np.abs(S - S_ref).max())
        assert err_o < 1e-5 and err_s < 1e-5, f"{name} {shape}: output {err_o:.2e}, state {err_s:.2e}"


def test_delta_rule_state_carries_across_calls():
    rng = np.random.default_rng(3)
    q, k, v, g, beta, S0 = _dn_inputs(rng, 40, 2, 4, 16, 16)
    o_ref, S_ref = _delta_rule_f64(q, k, v, g, beta, S0)
    S = S0.copy()
    out = np.empty_like(v)
    for a, b in ((0, 17), (17, 18), (18, 40)):
        part = np.empty_like(v[a:b])
        dn.delta_rule(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], S, part)
        out[a:b] = part
    assert np.abs(out - o_ref).max() < 1e-5 and np.abs(S - S_ref).max() < 1e-5


def test_conv1d_state_carries_across_calls():
    rng = np.random.default_rng(4)
    T, C, W = 23, 40, 4
    x = rng.standard_normal((T, C)).astype(np.float32)
    w = rng.standard_normal((C, W)).astype(np.float32)  # as ssm_conv1d: [C, W]
    xp = np.concatenate([np.zeros((W - 1, C)), x])  # causal: zeros before the first input
    pre = np.stack([(xp[t : t + W] * w.T).sum(0) for t in range(T)])
    ref = pre / (1 + np.exp(-pre))
    state = np.zeros((W - 1, C), dtype=np.float32)
    out = np.empty_like(x)
    for a, b in ((0, 1), (1, 3), (3, 10), (10, 11), (11, 23)):  # batches shorter and longer than W-1
        part = np.empty_like(x[a:b])
        dn.conv1d_silu(np.ascontiguousarray(x[a:b]), state, np.ascontiguousarray(w.T), part)
        out[a:b] = part
    assert np.abs(out - ref).max() < 1e-5
    assert np.array_equal(state, x[T - W + 1 :])


# ---- whole models against transformers ----------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flashmoe_gguf import Model  # noqa: E402
from tiny_qwen35 import write_qwen35_gguf  # noqa: E402


def _hf_qwen35(moe: bool, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1]},
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if moe:
        cfg = transformers.Qwen3_5MoeTextConfig(moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                                num_experts_per_tok=3, num_experts=8, **common)
        model = transformers.Qwen3_5MoeForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3_5TextConfig(intermediate_size=96, **common)
        model = transformers.Qwen3_5ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # away from the init so that a missing +1 or a swapped norm shows
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "linear_attn.norm" in name else 0.0))
            elif name.endswith(("A_log", "dt_bias")):
                continue  # the init spreads decays from slow to fast
            elif p.ndim >= 2:  # unit-scale activations; a decisive router (top-k not a near-tie)
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * (3.0 if name.endswith("mlp.gate.weight") else 1.0))
    return model.eval()


@pytest.fixture(scope="module", params=["qwen35moe", "qwen35"])
def pair(request, tmp_path_factory):
    hf = _hf_qwen35(moe=request.param == "qwen35moe")
    path = write_qwen35_gguf(hf, tmp_path_factory.mktemp("q35") / f"{request.param}.gguf")
    ids = np.random.default_rng(1).integers(0, VOCAB, size=170)
    with torch.no_grad():
        ref = hf(torch.tensor(ids[None])).logits[0].float().numpy()  # [170, V]
    return request.param, Model.load(path, n_batch=64), ids, ref


def _diff(a, ref):
    return float(np.max(np.abs(a - ref)) / ref.std())


def test_prefill_then_decode_match_transformers(pair):
    arch, model, ids, ref = pair
    assert model.config.arch == arch
    # prefill of 150 tokens in batches of 64, 64, 22: the states carry across forward calls
    ours = model.logits(ids[:150])
    d_prefill = _diff(ours, ref[:150])
    # then 20 single-token decode steps
    net = model.net
    steps = np.stack([net.forward(ids[p : p + 1], p)[0] for p in range(150, 170)])
    d_decode = _diff(steps, ref[150:170])
    print(f"{arch}: prefill max |diff|/std {d_prefill:.2e}, decode {d_decode:.2e}")
    assert d_prefill <= 1e-3
    assert d_decode <= 1e-3


def test_cached_prefix_is_recomputed_or_continued(pair):
    """Model._eval: a conversation that continues where the state stands reuses it; one that
    diverges from the cached tokens starts over (a recurrent state cannot rewind)."""
    _, model, ids, ref = pair
    model.reset()
    logits, n_cached = model._eval(ids[:100].tolist())
    assert n_cached == 0 and _diff(logits, ref[99]) <= 1e-3
    logits, n_cached = model._eval(ids[:120].tolist())  # continues
    assert n_cached == 100 and _diff(logits, ref[119]) <= 1e-3
    logits, n_cached = model._eval(ids[:60].tolist())  # a shorter prefix: recomputed from 0
    assert n_cached == 0 and _diff(logits, ref[59]) <= 1e-3
    with pytest.raises(Exception, match="recurrent state"):
        model.net.forward(ids[10:11], 10)


def test_logits_match_llama_cpp(pair):
    """llama.cpp (llama-cpp-python, F32 KV cache) on the same GGUF: prefill and decode logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    arch, model, ids, ref = pair
    llm = llama_cpp.Llama(str(model.file.path), n_ctx=256, n_batch=64, n_ubatch=64, logits_all=True,
                          verbose=False, n_threads=2, type_k=0, type_v=0)  # 0 = GGML_TYPE_F32
    llm.eval(ids[:150].tolist())
    for p in range(150, 170):
        llm.eval([int(ids[p])])
    theirs = np.array(llm.scores[:170], dtype=np.float32)
    ours = np.concatenate([model.logits(ids[:150]),
                           np.stack([model.net.forward(ids[p : p + 1], p)[0] for p in range(150, 170)])])
    d = _diff(ours, theirs)
    print(f"{arch}: vs llama.cpp max |diff|/std {d:.2e} (llama.cpp vs transformers {_diff(theirs, ref):.2e})")
    assert d <= 1e-3
