"""`flashmoe convert` on GptOssForCausalLM checkpoints: bf16 ones tensor by tensor equal to the
llama.cpp layout written by tests/tiny_gpt_oss.py (gate/up de-interleaved, experts transposed,
sinks, router bias), MXFP4 ones (``*_blocks``/``*_scales`` as the released checkpoints hold them,
checked against transformers' own MXFP4 decoder) kept as ggml MXFP4 or requantized, and logits
against transformers' float32 forward pass (sliding window shorter than the prompt)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gguf  # noqa: E402

from flashmoe_gguf.converters.convert import convert  # noqa: E402
from flashmoe_gguf.converters.gpt_oss import hf_mxfp4_to_ggml  # noqa: E402
from flashmoe_gguf.gguf_file import GGUFFile  # noqa: E402
from test_convert_util import normalized_maxdiff, save_bf16, train_tokenizer  # noqa: E402
from tiny_gpt_oss import round_experts_to_mxfp4, write_gpt_oss_gguf  # noqa: E402

MXFP4 = gguf.GGMLQuantizationType.MXFP4
WINDOW = 8


def _hf_model(vocab: int, mxfp4: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(
        vocab_size=vocab, hidden_size=96, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=3, sliding_window=WINDOW,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": True},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
            elif "bias" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]
                p.copy_(torch.randn_like(p) / p.shape[-2] ** 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * (3.0 if "router" in name else 1.0))
            p.copy_(p.to(torch.bfloat16).float())
    if mxfp4:
        round_experts_to_mxfp4(model)  # MXFP4 values are bf16 values too
    return model.eval()


def _to_hf_mxfp4(w_out_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., rows, cols] on the MXFP4 grid -> HF (blocks [..., cols/32, 16], scales [..., cols/32]):
    ggml's blocks (scale byte, element j low nibble / j+16 high) regrouped into adjacent pairs."""
    q = gguf.quants.quantize(np.ascontiguousarray(w_out_in, dtype=np.float32), MXFP4)
    q = q.reshape(*w_out_in.shape[:-1], -1, 17)
    scales, qs = q[..., 0], q[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element order
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(blocks), np.ascontiguousarray(scales)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def bf16_case(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("oss")
    model = _hf_model(len(tok) + 3, mxfp4=False, seed=1)
    save_bf16(model, folder)
    tok.save_pretrained(folder)
    ref_path = write_gpt_oss_gguf(model, folder.parent / "oss-ref.gguf")
    out = convert(folder, folder.parent / "oss.gguf", experts="f32", rest="f32", progress=False).out
    return model, folder, out, ref_path


@pytest.fixture(scope="module")
def mxfp4_case(tok, tmp_path_factory):
    """A checkpoint laid out as the released gpt-oss: expert weights as MXFP4 blocks and scales."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder = tmp_path_factory.mktemp("oss-mx")
    model = _hf_model(len(tok) + 3, mxfp4=True, seed=2)
    save_bf16(model, folder)
    tok.save_pretrained(folder)
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    for k in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = sd.pop(k).float()  # [E, in, out]
        blocks, scales = _to_hf_mxfp4(w.transpose(1, 2).numpy())  # output-major, as released
        blocks_t, scales_t = torch.from_numpy(blocks), torch.from_numpy(scales)
        # transformers' own MXFP4 decoder gives back the weights: the oracle of the HF layout
        assert torch.equal(convert_moe_packed_tensors(blocks_t, scales_t, dtype=torch.float32), w), k
        sd[k + "_blocks"], sd[k + "_scales"] = blocks_t, scales_t
    save_file(sd, str(path), metadata={"format": "pt"})
    ref_path = write_gpt_oss_gguf(model, folder.parent / "oss-mx-ref.gguf", mxfp4_experts=True)
    out = convert(folder, folder.parent / "oss-mx.gguf", experts="keep", rest="f32", progress=False).out
    return model, folder, out, ref_path


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _assert_same_tensors(out, ref_path):
    ours, ref = _tensors(out), _tensors(ref_path)
    assert sorted(ours) == sorted(ref)
    for name, r in ref.items():
        t = ours[name]
        assert list(t.shape) == list(r.shape) and t.tensor_type == r.tensor_type, name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(r.data), err_msg=name)


def test_tensors_and_metadata_equal_llama_cpp_layout(bf16_case):
    _, _, out, ref_path = bf16_case
    _assert_same_tensors(out, ref_path)
    md, md_ref = GGUFFile(out).metadata, GGUFFile(ref_path).metadata
    assert md["general.architecture"] == "gpt-oss"
    keys = sorted(k for k in md_ref if k.startswith("gpt-oss."))
    assert "gpt-oss.attention.sliding_window" in keys and "gpt-oss.rope.dimension_count" not in keys
    assert sorted(k for k in md if k.startswith("gpt-oss.")) == keys
    for k in keys:
        assert np.array_equal(np.asarray(md[k]), np.asarray(md_ref[k])), k


def test_mxfp4_kept_equal_llama_cpp_layout(mxfp4_case):
    _, _, out, ref_path = mxfp4_case
    _assert_same_tensors(out, ref_path)
    assert _tensors(out)["blk.0.ffn_gate_exps.weight"].tensor_type == MXFP4


def test_hf_mxfp4_repack_matches_transformers_decoder():
    """Random codes and scales: ggml's dequantization of the repacked blocks equals transformers'."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(2, 5, 3, 16), dtype=np.uint8)
    scales = rng.integers(118, 136, size=(2, 5, 3), dtype=np.uint8)
    ours = gguf.quants.dequantize(hf_mxfp4_to_ggml(blocks, scales), MXFP4)  # [2, 5, 96]
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    np.testing.assert_array_equal(ours, ref.transpose(1, 2).numpy())


def test_mxfp4_requantized(mxfp4_case, tmp_path):
    """--experts q8_0: the MXFP4 experts dequantized and requantized: within one Q8_0 step of the
    MXFP4 values (a wrong row or nibble order would be off by the weights' size)."""
    _, folder, out, _ = mxfp4_case
    q8 = convert(folder, tmp_path / "q8.gguf", experts="q8_0", rest="f32", progress=False).out
    ours, ref = _tensors(q8), _tensors(out)
    for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        assert ours[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
        a = gguf.quants.dequantize(np.asarray(ours[name].data), gguf.GGMLQuantizationType.Q8_0)
        b = gguf.quants.dequantize(np.asarray(ref[name].data), MXFP4)
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= np.max(np.abs(b)) / 127, name


def _float_experts(model):
    from flashmoe_gguf.kernels.cpu import mxfp4

    for blk in model.net.blocks:
        for t in (blk.mlp.gate, blk.mlp.up, blk.mlp.down):
            if t.qtype == mxfp4.QTYPE:
                t.matvec, t.matmul = mxfp4.matvec_f32, mxfp4.matmul_f32


@pytest.mark.parametrize("which", ["bf16", "mxfp4"])
def test_logits_match_transformers(which, bf16_case, mxfp4_case):
    from flashmoe_gguf import Model

    model, _, out, _ = bf16_case if which == "bf16" else mxfp4_case
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=40)
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].float().numpy()
    m = Model.load(out, n_batch=8)
    _float_experts(m)
    assert m.net.window == WINDOW
    ours = m.logits(ids[:20])  # prefill in batches, past the window
    steps = np.stack([m.net.forward(ids[p : p + 1], p)[0] for p in range(20, 40)])  # 20 decode steps
    d_prefill, d_decode = normalized_maxdiff(ours, ref[:20]), normalized_maxdiff(steps, ref[20:])
    print(f"gpt-oss {which}: prefill {d_prefill:.2e}, decode {d_decode:.2e}")
    assert d_prefill <= 1e-3 and d_decode <= 1e-3


@pytest.mark.slow  # ~15 s: llama.cpp's own load and graph setup
def test_llama_cpp_loads_the_conversion(bf16_case):
    """The converted file in llama.cpp (llama-cpp-python): transformers' logits, prefill + decode."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, _, out, _ = bf16_case
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=40)
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].float().numpy()
    llm = llama_cpp.Llama(str(out), n_ctx=256, n_batch=64, n_ubatch=64, logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0)  # F32 KV cache
    llm.eval(ids[:20].tolist())
    for t in ids[20:]:
        llm.eval([int(t)])
    d = normalized_maxdiff(np.array(llm.scores[:40], dtype=np.float32), ref)
    print(f"gpt-oss conversion in llama.cpp vs transformers: {d:.2e}")
    assert d <= 1e-3
