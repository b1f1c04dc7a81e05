"""`flashmoe convert` on Qwen3.5 checkpoints (Qwen3_5MoeForCausalLM, Qwen3_5ForCausalLM, and the text
part of a ConditionalGeneration folder): tensor by tensor equal to the llama.cpp layout written by
tests/tiny_qwen35.py from the same weights, and logits against transformers' float32 forward pass."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gguf  # noqa: E402

from flashmoe_gguf.converters.convert import convert  # noqa: E402
from flashmoe_gguf.converters.plan import fallback  # noqa: E402
from flashmoe_gguf.gguf_file import GGUFFile  # noqa: E402
from test_convert_util import normalized_maxdiff, save_bf16, train_tokenizer  # noqa: E402
from tiny_qwen35 import write_qwen35_gguf  # noqa: E402


def _hf_model(moe: bool, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
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
                pass  # the init spreads decays from slow to fast
            elif p.ndim >= 2:  # unit-scale activations; a decisive router
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * (3.0 if name.endswith("mlp.gate.weight") else 1.0))
            p.copy_(p.to(torch.bfloat16).float())  # the saved bf16 values exactly
    return model.eval()


@pytest.fixture(scope="module", params=["qwen35moe", "qwen35"])
def case(request, tmp_path_factory):
    moe = request.param == "qwen35moe"
    folder = tmp_path_factory.mktemp(request.param)
    tok = train_tokenizer()
    model = _hf_model(moe, len(tok) + 3, seed=1)  # (seed 0 has a router near-tie at one position: 1.1e-3 there)
    save_bf16(model, folder)
    tok.save_pretrained(folder)
    ref_path = write_qwen35_gguf(model, folder.parent / f"{request.param}-ref.gguf")
    out = convert(folder, folder.parent / f"{request.param}.gguf", experts="f32", rest="f32", progress=False).out
    return request.param, model, folder, out, ref_path


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_tensors_equal_llama_cpp_layout(case):
    arch, _, _, out, ref_path = case
    ours, ref = _tensors(out), _tensors(ref_path)
    assert sorted(ours) == sorted(ref)
    for name, r in ref.items():
        t = ours[name]
        assert list(t.shape) == list(r.shape), name
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(r.data), err_msg=name)
    md, md_ref = GGUFFile(out).metadata, GGUFFile(ref_path).metadata
    assert md["general.architecture"] == arch
    for k, v in md_ref.items():
        if k.startswith(arch + ".") and k != f"{arch}.vocab_size":  # llama.cpp writes it only for llama
            assert k in md and np.array_equal(np.asarray(md[k]), np.asarray(v)), k


def test_quantized_types(case, tmp_path):
    """Norms, conv, routers and the DeltaNet's per-head vectors stay F32; matrices take the types asked
    (or llama.cpp's fallback where the row length is not a multiple of the block)."""
    arch, _, folder, _, _ = case
    out = convert(folder, tmp_path / "q.gguf", experts="q4_0", rest="q8_0", progress=False).out
    Q = gguf.GGMLQuantizationType
    for name, t in _tensors(out).items():
        f32 = (len(t.shape) == 1 or "_norm." in name or ".ssm_conv1d." in name or ".ffn_gate_inp" in name
               or name.endswith((".ssm_a", ".ssm_dt.bias")))
        want = Q.F32 if f32 else fallback(Q.Q4_0 if "_exps." in name else Q.Q8_0, int(t.shape[0]))
        assert t.tensor_type == want, name


def test_logits_match_transformers(case):
    from flashmoe_gguf import Model

    arch, model, _, out, _ = case
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=90)
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].float().numpy()
    m = Model.load(out, n_batch=32)
    ours = m.logits(ids[:70])  # chunked prefill over three batches
    steps = np.stack([m.net.forward(ids[p : p + 1], p)[0] for p in range(70, 90)])  # 20 decode steps
    d_prefill, d_decode = normalized_maxdiff(ours, ref[:70]), normalized_maxdiff(steps, ref[70:])
    print(f"{arch}: prefill {d_prefill:.2e}, decode {d_decode:.2e}")
    assert d_prefill <= 1e-3 and d_decode <= 1e-3


def test_conditional_generation_folder(case, tmp_path, capsys):
    """Weights under model.language_model.*, config under text_config, a vision tower and an MTP
    head that are skipped: the same file as the text-only checkpoint."""
    from safetensors.torch import load_file, save_file

    arch, model, folder, out, _ = case
    sd = load_file(str(next(folder.glob("*.safetensors"))))
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in sd.items()}
    renamed["model.visual.patch_embed.proj.weight"] = torch.zeros(8, 3)
    renamed["mtp.fc.weight"] = torch.zeros(4, 4)
    vl = tmp_path / "vl"
    vl.mkdir()
    save_file(renamed, str(vl / "model.safetensors"), metadata={"format": "pt"})
    for f in folder.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "config.json":
            (vl / f.name).write_bytes(f.read_bytes())
    text = json.loads((folder / "config.json").read_text())
    cls = "Qwen3_5MoeForConditionalGeneration" if arch == "qwen35moe" else "Qwen3_5ForConditionalGeneration"
    (vl / "config.json").write_text(json.dumps({"architectures": [cls], "model_type": arch,
                                                "text_config": text, "vision_config": {"depth": 1}}))
    out2 = convert(vl, tmp_path / "vl.gguf", experts="f32", rest="f32", progress=False).out
    assert "skipping the vision tower" in capsys.readouterr().err
    ours, ref = _tensors(out2), _tensors(out)
    assert sorted(ours) == sorted(ref)
    for name, r in ref.items():
        np.testing.assert_array_equal(np.asarray(ours[name].data), np.asarray(r.data), err_msg=name)
