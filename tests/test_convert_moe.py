"""`flashmoe convert` on MoE Hugging Face checkpoints (mixtral, qwen2moe, qwen3moe, olmoe): per-expert
tensors stacked into llama.cpp's 3-D expert tensors, checked against the source and transformers."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gguf  # noqa: E402

from flashmoe_gguf.converters.convert import convert  # noqa: E402
from flashmoe_gguf.gguf_file import GGUFFile  # noqa: E402
from test_convert_util import corpus_ids, greedy_agreement, make_hf_model, mean_kl, normalized_maxdiff, ref_logits  # noqa: E402

ARCHS = ["mixtral", "qwen2moe", "qwen3moe", "olmoe"]
GGUF_ARCH = {"mixtral": "llama", "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "olmoe": "olmoe"}
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            folder = tmp_path_factory.mktemp(arch)
            model, tok = make_hf_model(folder, arch, seed=10 + ARCHS.index(arch))
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


def _expert_weights(model, layer: int, e: int) -> dict[str, np.ndarray]:
    """gate/up/down [rows, cols] of expert e, whatever the transformers layout."""
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    p = f"model.layers.{layer}.mlp.experts"
    if f"{p}.gate_up_proj" in sd:
        gu, down = sd[f"{p}.gate_up_proj"][e], sd[f"{p}.down_proj"][e]
        F = gu.shape[0] // 2
        return {"gate": gu[:F], "up": gu[F:], "down": down}
    return {k: sd[f"{p}.{e}.{k}_proj.weight"] for k in ("gate", "up", "down")}


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_stacked(hf, tmp_path, arch):
    folder, model, _ = hf(arch)
    out = convert(folder, tmp_path / "m.gguf", experts="f32", rest="f32", progress=False).out
    r = gguf.GGUFReader(out)
    tensors = {t.name: t for t in r.tensors}
    cfg = model.config
    E = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    for layer in range(cfg.num_hidden_layers):
        for e in (0, E - 1):
            want = _expert_weights(model, layer, e)
            for k, w in want.items():
                t = tensors[f"blk.{layer}.ffn_{k}_exps.weight"]
                assert list(t.shape) == [w.shape[1], w.shape[0], E]
                np.testing.assert_array_equal(np.asarray(t.data)[e], w)
        assert list(tensors[f"blk.{layer}.ffn_gate_inp.weight"].shape) == [cfg.hidden_size, E]
    md = GGUFFile(out).metadata
    a = GGUF_ARCH[arch]
    assert md[f"{a}.expert_count"] == E
    assert md[f"{a}.expert_used_count"] == cfg.num_experts_per_tok
    if arch in ("qwen2moe", "qwen3moe"):
        assert md[f"{a}.expert_feed_forward_length"] == cfg.moe_intermediate_size
    if arch == "qwen2moe":
        assert md[f"{a}.expert_shared_feed_forward_length"] == cfg.shared_expert_intermediate_size
        assert list(tensors["blk.0.ffn_gate_inp_shexp.weight"].shape) == [cfg.hidden_size, 1]
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"].tensor_type == Q.F32
    if arch == "olmoe":
        assert md["olmoe.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_transformers(hf, tmp_path, arch):
    folder, model, tok = hf(arch)
    out = convert(folder, tmp_path / "m.gguf", experts="f32", rest="f32", progress=False).out
    ids = _ids(tok)
    diff = normalized_maxdiff(_load(out).logits(ids), ref_logits(model, ids))
    print(f"{arch} F32: max |diff| / std = {diff:.2e}")
    assert diff <= 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_kl_and_greedy(hf, tmp_path, arch):
    folder, model, tok = hf(arch)
    out = convert(folder, tmp_path / "m.gguf", experts="q8_0", rest="q8_0", progress=False).out
    ours = _load(out)
    ids = corpus_ids(tok)[:48]  # text like the model's (brief) training
    kl = mean_kl(ours.logits(ids), ref_logits(model, ids))
    print(f"{arch} Q8_0: mean KL = {kl:.2e}")
    assert kl < 1e-3
    exact, unexplained = greedy_agreement(ours, model, [int(i) for i in _ids(tok, 6, seed=4)], 16)
    print(f"{arch} Q8_0: greedy {exact}/16 tokens equal, the others near-ties")
    assert not unexplained and exact >= 14


@pytest.mark.parametrize("arch", ARCHS)
def test_q4_k_experts_kl(hf, tmp_path, arch):
    folder, model, tok = hf(arch)
    out = convert(folder, tmp_path / "m.gguf", experts="q4_k", rest="q8_0", progress=False).out
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    cfg = model.config
    F = cfg.moe_intermediate_size if arch in ("qwen2moe", "qwen3moe") else cfg.intermediate_size
    assert types["blk.0.ffn_gate_exps.weight"] == (Q.Q4_K if cfg.hidden_size % 256 == 0 else Q.Q5_0)
    assert types["blk.0.ffn_down_exps.weight"] == (Q.Q4_K if F % 256 == 0 else Q.Q5_0)
    ours = _load(out)
    ids = corpus_ids(tok)[:48]  # text like the model's (brief) training
    kl = mean_kl(ours.logits(ids), ref_logits(model, ids))
    print(f"{arch} Q4_K experts, Q8_0 rest: mean KL = {kl:.2e}")
    assert kl < 5e-3


def test_fused_expert_checkpoint(hf, tmp_path):
    """transformers' fused expert layout (mlp.experts.gate_up_proj [E, 2F, D], down_proj [E, D, F])
    converts to the same tensors as the per-expert layout."""
    from safetensors.torch import load_file, save_file
    import shutil

    folder, model, _ = hf("qwen3moe")
    fused = tmp_path / "fused"
    shutil.copytree(folder, fused)
    sd = load_file(fused / "model.safetensors")
    E = model.config.num_experts
    for layer in range(model.config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        gate = [sd.pop(f"{p}.{e}.gate_proj.weight") for e in range(E)]
        up = [sd.pop(f"{p}.{e}.up_proj.weight") for e in range(E)]
        down = [sd.pop(f"{p}.{e}.down_proj.weight") for e in range(E)]
        sd[f"{p}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        sd[f"{p}.down_proj"] = torch.stack(down)
    save_file(sd, fused / "model.safetensors")
    a = convert(folder, tmp_path / "a.gguf", experts="q8_0", rest="q8_0", progress=False).out
    b = convert(fused, tmp_path / "b.gguf", experts="q8_0", rest="q8_0", progress=False).out
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type
        np.testing.assert_array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data), err_msg=name)
