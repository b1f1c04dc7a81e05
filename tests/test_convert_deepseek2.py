"""`flashmoe convert` on DeepseekV3ForCausalLM checkpoints: tensor by tensor equal to the llama.cpp
layout written by tests/tiny_deepseek.py from the same weights (kv_b split per head, the
score-correction bias, MTP layers skipped), logits against transformers' float32 forward pass, and
FP8 block-scaled checkpoints against the same weights dequantized by torch."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gguf  # noqa: E402

from flashmoe_gguf.converters.convert import convert  # noqa: E402
from flashmoe_gguf.converters.safetensors_io import f8_e4m3_to_f32  # noqa: E402
from flashmoe_gguf.gguf_file import GGUFFile  # noqa: E402
from test_convert_util import normalized_maxdiff, save_bf16, train_tokenizer  # noqa: E402
from tiny_deepseek import write_deepseek2_gguf  # noqa: E402


def _hf_model(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
        qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
        norm_topk_prob=True, max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif p.ndim >= 2:  # unit-scale activations; a decisive router
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * (3.0 if name.endswith("mlp.gate.weight") else 1.0))
            p.copy_(p.to(torch.bfloat16).float())  # the saved bf16 values exactly
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # large enough to change the selection
                b.copy_((torch.randn_like(b) * 0.3).to(torch.bfloat16).float())
    return model.eval()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    tok = train_tokenizer()
    model = _hf_model(len(tok) + 3, seed=1)
    save_bf16(model, folder)
    tok.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["scoring_func"] = "sigmoid"  # as DeepSeek-V3's config.json says
    (folder / "config.json").write_text(json.dumps(cfg))
    ref_path = write_deepseek2_gguf(model, folder.parent / "ds-ref.gguf")
    out = convert(folder, folder.parent / "ds.gguf", experts="f32", rest="f32", progress=False).out
    return model, folder, out, ref_path


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _assert_same_tensors(out, ref_path):
    ours, ref = _tensors(out), _tensors(ref_path)
    assert sorted(ours) == sorted(ref)
    for name, r in ref.items():
        t = ours[name]
        assert list(t.shape) == list(r.shape), name
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(r.data), err_msg=name)


def test_tensors_and_metadata_equal_llama_cpp_layout(case):
    _, _, out, ref_path = case
    _assert_same_tensors(out, ref_path)
    md, md_ref = GGUFFile(out).metadata, GGUFFile(ref_path).metadata
    assert md["general.architecture"] == "deepseek2"
    keys = [k for k in md_ref if k.startswith("deepseek2.")]
    assert "deepseek2.attention.key_length_mla" in keys and "deepseek2.rope.scaling.yarn_log_multiplier" in keys
    for k in keys:
        assert k in md and np.array_equal(np.asarray(md[k]), np.asarray(md_ref[k])), k
    assert sorted(k for k in md if k.startswith("deepseek2.")) == sorted(keys)


def test_logits_match_transformers(case):
    from flashmoe_gguf import Model

    model, _, out, _ = case
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=40)
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].float().numpy()
    m = Model.load(out, n_batch=8)
    ours = m.logits(ids[:20])  # prefill in batches
    steps = np.stack([m.net.forward(ids[p : p + 1], p)[0] for p in range(20, 40)])  # 20 decode steps
    d_prefill, d_decode = normalized_maxdiff(ours, ref[:20]), normalized_maxdiff(steps, ref[20:])
    print(f"deepseek2: prefill {d_prefill:.2e}, decode {d_decode:.2e}")
    assert d_prefill <= 1e-3 and d_decode <= 1e-3


def test_mtp_layers_skipped(case, tmp_path, capsys):
    """A layer past num_hidden_layers (DeepSeek-V3's multi-token-prediction module) is not converted."""
    from safetensors.torch import load_file, save_file

    _, folder, out, _ = case
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
    sd["model.layers.3.self_attn.kv_b_proj.weight"] = torch.zeros(112, 32, dtype=torch.bfloat16)
    mtp = tmp_path / "mtp"
    mtp.mkdir()
    save_file(sd, str(mtp / "model.safetensors"), metadata={"format": "pt"})
    for f in folder.iterdir():
        if not f.name.endswith(".safetensors"):
            (mtp / f.name).write_bytes(f.read_bytes())
    out2 = convert(mtp, tmp_path / "mtp.gguf", experts="f32", rest="f32", progress=False).out
    assert "multi-token-prediction" in capsys.readouterr().err
    _assert_same_tensors(out2, out)


def test_f8_e4m3_table_matches_torch():
    bits = torch.arange(256, dtype=torch.uint8)
    want = bits.view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(f8_e4m3_to_f32(bits.numpy()), want)  # NaNs compare equal here


def _fp8_block(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, scale_inv [ceil(R/b), ceil(C/b)]) with W ~ fp8 * scale_inv per block."""
    R, C = w.shape
    nr, nc = -(-R // block), -(-C // block)
    pad = torch.zeros(nr * block, nc * block)
    pad[:R, :C] = w
    amax = pad.reshape(nr, block, nc, block).abs().amax(dim=(1, 3)).clamp(min=1e-8)
    scale = amax / 448.0
    rep = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:R, :C]
    return (w / rep).to(torch.float8_e4m3fn), scale.float()


def test_fp8_checkpoint_equals_dequantized(case, tmp_path):
    """Linear weights as float8 e4m3 with 16x16 block scales (blocks cropped at the edges: 40, 24
    and 112 rows): the conversion equals converting the weights dequantized by torch."""
    from safetensors.torch import load_file, save_file

    _, folder, _, _ = case
    sd = load_file(str(folder / "model.safetensors"))
    fp8, deq = {}, {}
    for k, v in sd.items():
        if v.ndim == 2 and k.startswith("model.layers.") and "proj.weight" in k:
            q, s = _fp8_block(v.float(), 16)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            rep = s.repeat_interleave(16, 0).repeat_interleave(16, 1)[: v.shape[0], : v.shape[1]]
            deq[k] = q.float() * rep
        else:
            fp8[k], deq[k] = v, v.float()
    assert fp8["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    cfg = json.loads((folder / "config.json").read_text())
    for name, tensors, extra in (("fp8", fp8, {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                      "weight_block_size": [16, 16]}}),
                                 ("deq", deq, {})):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        for f in folder.iterdir():
            if not f.name.endswith(".safetensors") and f.name != "config.json":
                (d / f.name).write_bytes(f.read_bytes())
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
    a = convert(tmp_path / "fp8", tmp_path / "fp8.gguf", experts="f32", rest="f32", progress=False, ).out
    b = convert(tmp_path / "deq", tmp_path / "deq.gguf", experts="f32", rest="f32", progress=False).out
    _assert_same_tensors(a, b)
    # and the weights are close to the original ones (the FP8 rounding only)
    w = np.asarray(_tensors(a)["blk.1.attn_q_b.weight"].data)
    orig = sd["model.layers.1.self_attn.q_b_proj.weight"].float().numpy()
    assert 0 < np.max(np.abs(w - orig)) < 0.1 * np.max(np.abs(orig))


def test_deepseek_v2_lite_style(tmp_path):
    """DeepseekV2ForCausalLM as V2-Lite is built: no q LoRA, softmax routing without groups, two
    shared experts, no score-correction bias: logits against transformers."""
    from flashmoe_gguf import Model

    tok = train_tokenizer()
    torch.manual_seed(3)
    cfg = transformers.DeepseekV2Config(
        vocab_size=len(tok) + 3, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
        kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16,
        num_experts_per_tok=3, first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=False,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    model = transformers.DeepseekV2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * (3.0 if name.endswith("mlp.gate.weight") else 1.0))
            p.copy_(p.to(torch.bfloat16).float())
    model.eval()
    save_bf16(model, tmp_path / "v2")
    tok.save_pretrained(tmp_path / "v2")
    out = convert(tmp_path / "v2", tmp_path / "v2.gguf", experts="f32", rest="f32", progress=False).out
    md = GGUFFile(out).metadata
    assert md["deepseek2.expert_gating_func"] == 1 and "deepseek2.q_lora_rank" not in md
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=30)
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].float().numpy()
    m = Model.load(out, n_batch=8)
    ours = m.logits(ids[:20])
    steps = np.stack([m.net.forward(ids[p : p + 1], p)[0] for p in range(20, 30)])
    d_prefill, d_decode = normalized_maxdiff(ours, ref[:20]), normalized_maxdiff(steps, ref[20:])
    print(f"deepseek2 (V2-Lite style): prefill {d_prefill:.2e}, decode {d_decode:.2e}")
    assert d_prefill <= 1e-3 and d_decode <= 1e-3


def _llama_cpp_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=64, n_ubatch=64, logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0)  # F32 KV cache
    llm.eval(ids[:20].tolist())
    for t in ids[20:]:
        llm.eval([int(t)])
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.mark.slow  # ~15 s: llama.cpp's own load and graph setup
def test_llama_cpp_loads_the_conversion(case):
    """The converted file in llama.cpp (llama-cpp-python): transformers' logits, prefill + decode."""
    model, _, out, _ = case
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=40)
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].float().numpy()
    d = normalized_maxdiff(_llama_cpp_logits(out, ids), ref)
    print(f"deepseek2 conversion in llama.cpp vs transformers: {d:.2e}")
    assert d <= 1e-3
