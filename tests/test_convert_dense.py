"""`flashmoe convert` on dense Hugging Face checkpoints (llama, mistral, qwen2, qwen3): tiny random
bf16 models with a trained tokenizer, converted and checked against transformers and the source."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gguf  # noqa: E402

from flashmoe_gguf.converters.convert import convert  # noqa: E402
from flashmoe_gguf.gguf_file import GGUFFile  # noqa: E402
from flashmoe_gguf.tokenizer import Tokenizer  # noqa: E402
from test_convert_util import (CHAT_TEMPLATE, corpus_ids, greedy_agreement, make_hf_model, mean_kl,  # noqa: E402
                               normalized_maxdiff, ref_logits, save_bf16)
from tiny_gguf import llama_permute  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """arch -> (folder, float32 transformers model, tokenizer), built once per module."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            folder = tmp_path_factory.mktemp(arch)
            model, tok = make_hf_model(folder, arch, seed=ARCHS.index(arch))
            cache[arch] = folder, model, tok
        return cache[arch]

    return get


def _load(path):
    from flashmoe_gguf import Model

    try:
        return Model.load(path, n_batch=16)
    except Exception as e:  # noqa: BLE001
        if "no CPU kernel" in str(e):
            pytest.skip(f"runtime kernel missing: {e}")
        raise


def _ids(tok, n=40, seed=1):
    return np.random.default_rng(seed).integers(0, len(tok), size=n)


@pytest.mark.parametrize("arch", ARCHS)
def test_tensors_match_checkpoint(hf, tmp_path, arch):
    """Every weight lands under its llama.cpp name with its values (q/k rows reordered for llama)."""
    folder, model, _ = hf(arch)
    out = convert(folder, tmp_path / "m.gguf", rest="f32", progress=False).out
    r = gguf.GGUFReader(out)
    assert r.fields["general.architecture"].contents() == GGUF_ARCH[arch]
    tensors = {t.name: t for t in r.tensors}
    cfg = model.config
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
                 "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}": f"blk.{i}.{v}" for k, v in per_layer.items()})
    sd = model.state_dict()
    assert {names[k] for k in sd} == set(tensors)
    for k, v in sd.items():
        want = v.float().numpy()
        if GGUF_ARCH[arch] == "llama" and ("q_proj" in k or "k_proj" in k):
            want = llama_permute(want, cfg.num_attention_heads if "q_proj" in k else cfg.num_key_value_heads)
        t = tensors[names[k]]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        got = np.asarray(t.data).reshape(want.shape)
        np.testing.assert_array_equal(got, want, err_msg=k)


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_and_tokenizer(hf, tmp_path, arch):
    folder, model, tok = hf(arch)
    out = convert(folder, tmp_path / "m.gguf", rest="q8_0", progress=False).out
    gf = GGUFFile(out)
    md = gf.metadata
    a = GGUF_ARCH[arch]
    cfg = model.config
    assert md[f"{a}.block_count"] == cfg.num_hidden_layers
    assert md[f"{a}.embedding_length"] == cfg.hidden_size
    assert md[f"{a}.feed_forward_length"] == cfg.intermediate_size
    assert md[f"{a}.attention.head_count"] == cfg.num_attention_heads
    assert md[f"{a}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert md[f"{a}.context_length"] == cfg.max_position_embeddings
    assert md[f"{a}.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert md[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert md["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert md["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.pre"] == "gpt-2"  # a plain ByteLevel pre-tokenizer
    assert md["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert md["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert md["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    ours = Tokenizer.from_metadata(md)
    texts = ["Hello world, the quick brown fox!", "<|im_start|>user\nhi there<|im_end|>", "café 12345 naïve",
             "  spaces\n\nand\ttabs  "]
    for text in texts:
        assert ours.encode(text, add_special=False) == tok.encode(text, add_special_tokens=False), text
        assert ours.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_transformers(hf, tmp_path, arch):
    folder, model, tok = hf(arch)
    out = convert(folder, tmp_path / "m.gguf", rest="f32", progress=False).out
    ids = _ids(tok)
    diff = normalized_maxdiff(_load(out).logits(ids), ref_logits(model, ids))
    print(f"{arch} F32: max |diff| / std = {diff:.2e}")
    assert diff <= 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_f16_logits_match_transformers(hf, tmp_path, arch):
    import copy

    folder, model, tok = hf(arch)
    out = convert(folder, tmp_path / "m.gguf", rest="f16", progress=False).out
    rounded = copy.deepcopy(model)  # the oracle computes in float32 on the same f16-rounded matrices
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    ids = _ids(tok)
    ours = _load(out)
    diff = normalized_maxdiff(ours.logits(ids), ref_logits(rounded, ids))
    print(f"{arch} F16: max |diff| / std = {diff:.2e}")
    assert diff <= 1e-3
    # greedy continuations over 16 tokens are equal, token for token
    prompt = [int(i) for i in _ids(tok, 6, seed=4)]
    got = [c.token for c in ours.generate(prompt, max_tokens=16, temperature=0) if c.token is not None]
    with torch.no_grad():
        want = rounded.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert got and got == want[: len(got)]  # ours stops early only at an end-of-generation token


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_kl_and_greedy(hf, tmp_path, arch):
    folder, model, tok = hf(arch)
    out = convert(folder, tmp_path / "m.gguf", rest="q8_0", progress=False).out
    ours = _load(out)
    ids = corpus_ids(tok)[:48]  # text like the model's (brief) training
    kl = mean_kl(ours.logits(ids), ref_logits(model, ids))
    print(f"{arch} Q8_0: mean KL = {kl:.2e}")
    assert kl < 1e-3
    exact, unexplained = greedy_agreement(ours, model, [int(i) for i in _ids(tok, 6, seed=4)], 16)
    print(f"{arch} Q8_0: greedy {exact}/16 tokens equal, the others near-ties")
    assert not unexplained and exact >= 14


def test_tied_embeddings_and_sharded_checkpoint(tmp_path):
    """A checkpoint in several shards (with model.safetensors.index.json) and tied embeddings."""
    import json

    folder = tmp_path / "hf"
    model, tok = make_hf_model(folder, "qwen2", seed=9, tie=True)
    save_bf16(model, folder, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for f in folder.glob("model.safetensors"):
        f.unlink()
    out = convert(folder, tmp_path / "m.gguf", rest="f32", progress=False).out
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    ids = _ids(tok)
    assert normalized_maxdiff(_load(out).logits(ids), ref_logits(model, ids)) <= 1e-3


def test_dry_run_prints_plan(hf, tmp_path, capsys):
    from flashmoe_gguf.cli import main

    folder, model, _ = hf("llama")
    out = tmp_path / "never.gguf"
    assert main(["convert", str(folder), "-o", str(out), "--rest", "q4_k", "--type", r"ffn_down=q8_0",
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    lines = {l.split()[0]: l for l in text.splitlines() if l.startswith(("blk.", "token_embd", "output"))}
    # hidden 64 is not a multiple of 256: Q4_K falls back to Q5_0 as llama.cpp does
    assert " Q5_0 " in lines["blk.0.attn_q.weight"] and "Q4_K needs rows of 256" in lines["blk.0.attn_q.weight"]
    assert " Q8_0 " in lines["blk.0.ffn_down.weight"]  # the --type override
    assert " F32 " in lines["blk.0.attn_norm.weight"]
    assert "total:" in text
