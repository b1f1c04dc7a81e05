"""Dense decoders (llama, qwen2, qwen3) against transformers' float32 forward on tiny random models."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flashmoe_gguf import Model  # noqa: E402
from tiny_gguf import write_decoder_gguf  # noqa: E402

VOCAB = 300


def _hf_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=24, rope_theta=1000000.0)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # random biases and norm weights, so that they matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _ref_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids[None], dtype=torch.long)).logits[0].float().numpy()


def _normalized_maxdiff(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / ref.std())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers_f32(tmp_path, arch):
    hf = _hf_model(arch)
    path = write_decoder_gguf(hf, tmp_path / f"{arch}.gguf", arch)
    model = Model.load(path, n_batch=16)  # several prefill chunks
    ids = np.random.default_rng(1).integers(0, VOCAB, size=40)
    ref = _ref_logits(hf, ids)
    ours = model.logits(ids)
    assert ours.shape == ref.shape
    diff = _normalized_maxdiff(ours, ref)
    print(f"{arch}: max |diff| / std = {diff:.2e}")
    assert diff <= 1e-3


def test_incremental_decode_matches_full_pass(tmp_path):
    """Prefill then one-token steps through the KV cache give the full pass's logits."""
    hf = _hf_model("llama", seed=3)
    model = Model.load(write_decoder_gguf(hf, tmp_path / "m.gguf", "llama"))
    ids = np.random.default_rng(2).integers(0, VOCAB, size=24)
    ref = _ref_logits(hf, ids)
    net = model.net
    out = [net.forward(ids[:10], 0)[0]]
    for pos in range(10, len(ids)):
        out.append(net.forward(ids[pos : pos + 1], pos)[0])
    ours = np.stack(out)
    assert _normalized_maxdiff(ours, ref[9:]) <= 1e-3


def test_greedy_generation_matches_transformers(tmp_path):
    hf = _hf_model("qwen2", seed=5)
    model = Model.load(write_decoder_gguf(hf, tmp_path / "q.gguf", "qwen2"))
    prompt = [5, 17, 42, 99, 7]
    ours = [c.token for c in model.generate(prompt, max_tokens=12, temperature=0) if c.token is not None]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def test_f16_weights_match(tmp_path):
    import gguf

    hf = _hf_model("llama", seed=7)
    path = write_decoder_gguf(hf, tmp_path / "h.gguf", "llama", qtype=gguf.GGMLQuantizationType.F16)
    with torch.no_grad():  # the oracle computes in float32 on the same f16-rounded matrices
        for name, p in hf.named_parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    ids = np.random.default_rng(3).integers(0, VOCAB, size=16)
    diff = _normalized_maxdiff(Model.load(path).logits(ids), _ref_logits(hf, ids))
    print(f"f16 weights: max |diff| / std = {diff:.2e}")
    assert diff <= 1e-3


class _AheadNet:
    """A CPU net behind ``decode_greedy``'s contract as the GPU keeps it: each step feeds its
    own argmax to the next, and steps run ahead of the token the caller reads (so that where
    the caller stops, K/V of steps it never saw lie past the tokens it keeps)."""

    greedy_on_device = True

    def __init__(self, net, ahead=3):
        self.net, self.ahead, self.calls = net, ahead, 0

    def __getattr__(self, name):
        return getattr(self.net, name)

    def forward(self, *a, **k):
        return self.net.forward(*a, **k)

    def decode_greedy(self, tok, pos, n):
        assert pos + n <= self.net.n_ctx
        self.calls += 1
        out, state = [], [tok, pos]

        def step():
            state[0] = int(np.argmax(self.net.forward(np.array([state[0]]), state[1])[0]))
            state[1] += 1
            out.append(state[0])

        for _ in range(min(self.ahead, n)):
            step()
        for i in range(n):
            if len(out) < n:
                step()
            yield out[i]


def test_greedy_steps_chained_on_the_device(tmp_path):
    # Model.generate's greedy path through a net whose steps chain on the device (as on a GPU):
    # the tokens of transformers' greedy search; stopped early, the cache holds only what it
    # kept (the continuation from that prefix gives the rest); at the end of the context it
    # asks for no step past it
    hf = _hf_model("qwen2", seed=5)
    path = write_decoder_gguf(hf, tmp_path / "q.gguf", "qwen2")
    prompt = [5, 17, 42, 99, 7]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    model = Model.load(path)
    model.net = net = _AheadNet(model.net)
    toks = lambda g: [c.token for c in g if c.token is not None]  # noqa: E731
    assert toks(model.generate(prompt, max_tokens=12, temperature=0)) == ref
    assert net.calls == 1
    assert toks(model.generate(prompt, max_tokens=5, temperature=0)) == ref[:5]
    assert toks(model.generate(prompt + ref[:5], max_tokens=7, temperature=0)) == ref[5:]
    assert net.calls == 3
    other = prompt + ref[:3] + [(ref[3] + 1) % VOCAB]  # a turn the run-ahead steps did not take
    fresh = Model.load(path)
    assert toks(model.generate(other, max_tokens=6, temperature=0)) == toks(fresh.generate(other, max_tokens=6,
                                                                                          temperature=0))
    assert net.calls == 4
    # sampling with a temperature, or a repetition penalty, keeps the host's steps
    list(model.generate(prompt, max_tokens=4, temperature=0, repeat_penalty=1.1))
    assert net.calls == 4
    small = Model.load(path, n_ctx=len(prompt) + 6)
    plain = toks(small.generate(prompt, max_tokens=20, temperature=0))
    small.net = _AheadNet(small.net)
    small.reset()
    assert toks(small.generate(prompt, max_tokens=20, temperature=0)) == plain == ref[:6]


def test_decode_step_graph_recording():
    # the GPU's decode steps: two plain steps (kernels compiled, buffers allocated), then one
    # recording replayed; a top-k change: two plain steps and a new recording; a refused
    # recording: plain steps from then on (the driver's calls stood in for)
    from flashmoe_gguf.arch.cuda_llama import _StepGraph

    class G:
        graphs, k, log = True, 2, []
        refuse = False

        def _key(self):
            return (self.k,)

        def _capture(self, launches):
            self.log.append("capture")
            return None if self.refuse else f"graph{self.k}"

        def _launch(self, ex):
            self.log.append(ex)

    g = G()
    sg = _StepGraph(g, lambda: g.log.append("plain"))
    for _ in range(4):
        sg()
    assert g.log == ["plain", "plain", "capture", "graph2", "graph2"] and sg.ready()
    g.k, g.log[:] = 3, []
    assert not sg.ready()
    for _ in range(3):
        sg()
    assert g.log == ["plain", "plain", "capture", "graph3"]
    g.k, g.refuse, g.log[:] = 4, True, []
    for _ in range(4):
        sg()
    assert g.log == ["plain", "plain", "capture", "plain", "plain"] and not g.graphs and not sg.ready()


def test_hybrid_step_graph_recording():
    # a hybrid decode step: the launches between two host parts (the routing of a MoE block) as
    # one recorded graph each. Two plain steps; the third runs while it is recorded, segment by
    # segment; then replays: per block, one graph launch and the host part; a top-k change: two
    # plain steps and a new recording; a refused recording: that step again as plain launches
    # (the driver's calls stood in for; executed launches are logged, recorded ones are not)
    from flashmoe_gguf.arch.cuda_llama import CudaLlama, _HybridStep

    class G:
        seg_graphs, k, log = True, 2, []
        refuse_at = None  # the capture (counted from 0) the driver refuses
        step = [0, 0]
        _run = CudaLlama._run

        def __init__(self):
            self.rec = None
            self.captures = 0

        def _key(self):
            return (self.k,)

        def _op(self, name):
            (self.log if self.rec is None else self.rec).append(name)

        def _run_gen(self, T, tok, pos, p2, all_logits):
            for name in ("emb", "L0"):
                self._op(name)
            yield "A"
            for name in ("postA", "L1"):
                self._op(name)
            yield "B"
            for name in ("postB", "out"):
                self._op(name)
            return "logits"

        def _host_part(self, moe):
            self.log.append(f"host{moe}")

        def _capture(self, launches):
            self.rec = []
            try:
                launches()
            finally:
                ops, self.rec = self.rec, None
            self.captures += 1
            if self.refuse_at == self.captures - 1:
                return None
            return tuple(ops)

        def _launch(self, ex):
            self.log.append("launch")
            self.log.extend(ex)

    plain = ["emb", "L0", "hostA", "postA", "L1", "hostB", "postB", "out"]
    g = G()
    hs = _HybridStep(g)
    for _ in range(2):
        hs()
    assert g.log == plain * 2 and not hs.ready()
    g.log[:] = []
    hs()  # recorded while it runs: the same launches, in the same order
    assert [x for x in g.log if x != "launch"] == plain and g.log.count("launch") == 3 and hs.ready()
    assert g.captures == 3
    g.log[:] = []
    hs()
    hs()
    assert g.log == ["launch", "emb", "L0", "hostA", "launch", "postA", "L1", "hostB", "launch", "postB", "out"] * 2
    assert g.captures == 3
    g.k, g.log[:] = 3, []
    assert not hs.ready()
    for _ in range(3):
        hs()
    assert [x for x in g.log if x != "launch"] == plain * 3 and g.log.count("launch") == 3 and hs.ready()
    g.k, g.refuse_at, g.log[:] = 4, g.captures + 1, []
    for _ in range(4):  # two plain steps; the third: segment 0 ran, segment 1 refused, then plain
        hs()
    assert g.log[:16] == plain * 2
    assert g.log[16:20] == ["launch", "emb", "L0", "hostA"]
    assert g.log[20:] == plain * 2 and not g.seg_graphs and not hs.ready()
