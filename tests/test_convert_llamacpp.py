"""Converted files load in llama.cpp (llama-cpp-python) and compute what transformers computes."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

from flashmoe_gguf.converters.convert import convert  # noqa: E402
from test_convert_util import make_hf_model, mean_kl, ref_logits  # noqa: E402


@pytest.mark.parametrize("arch, experts, rest, max_kl", [
    ("llama", "q4_k", "q8_0", 1e-3),
    pytest.param("qwen3", "q4_k", "q8_0", 1e-3, marks=pytest.mark.slow),
    ("mixtral", "q4_k", "q8_0", 5e-3),
    pytest.param("qwen2moe", "q4_k", "q8_0", 5e-3, marks=pytest.mark.slow),
    ("qwen3moe", "q4_k", "q8_0", 5e-3),
    pytest.param("olmoe", "q2_k", "q6_k", 5e-2, marks=pytest.mark.slow),
])
def test_llama_cpp_loads_and_agrees(tmp_path, arch, experts, rest, max_kl):
    model, tok = make_hf_model(tmp_path / "hf", arch, seed=3)
    out = convert(tmp_path / "hf", tmp_path / "m.gguf", experts=experts, rest=rest, progress=False).out
    llm = llama_cpp.Llama(str(out), logits_all=True, verbose=False, n_ctx=128, n_threads=2, seed=0)
    ids = [int(i) for i in np.random.default_rng(1).integers(0, len(tok), 32)]
    llm.eval(ids)
    kl = mean_kl(np.array(llm.scores[: len(ids)]), ref_logits(model, ids))
    print(f"{arch} ({experts} experts, {rest} rest) in llama.cpp: mean KL vs transformers = {kl:.2e}")
    assert kl < max_kl
    llm.reset()
    text = llm.create_completion("The quick brown", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert llm.n_tokens > 3  # it generated (random weights: the text itself means nothing)
    assert isinstance(text, str)
