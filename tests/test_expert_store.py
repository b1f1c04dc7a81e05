"""The page cache as the expert store: only routed experts become resident; the resident cap holds."""
from __future__ import annotations

import gc
import time

import gguf
import numpy as np
import pytest

from flashmoe_gguf import Model
from flashmoe_gguf.expert_store import PAGE, evict_file, resident_pages
from tiny_gguf import random_llama_state, write_state_gguf

E = 32  # experts per layer; each expert ~0.4 MB in Q8_0, so one expert spans ~100 pages


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    cfg, sd = random_llama_state(seed=11, hidden=256, ff=512, layers=3, heads=4, kv_heads=2, n_expert=E,
                                 n_expert_used=2)
    return write_state_gguf(cfg, sd, tmp_path_factory.mktemp("moe") / "moe.gguf", "llama",
                            qtype=gguf.GGMLQuantizationType.Q8_0)


def _expert_arrays(model):
    for blk in model.net.blocks:
        mlp = blk.mlp
        for e in range(mlp.n_expert):
            yield mlp.layer, e, [t.w[e] for t in (mlp.gate, mlp.up, mlp.down)]


def _resident_fraction(arrs) -> float:
    res = tot = 0
    for a in arrs:
        r, n = resident_pages(a)
        res += r
        tot += n
    return res / tot


@pytest.mark.parametrize("method", ["populate", "willneed", "pread"])
def test_only_routed_experts_become_resident(moe_path, method):
    gc.collect()  # models of earlier tests must be unmapped: the kernel keeps mapped pages cached
    evict_file(moe_path)  # no mapping exists yet: the whole file leaves the page cache
    model = Model.load(moe_path, expert_read=method)
    # Parsing the header faults its pages in, and the kernel's readahead window (often several
    # MB) brings the start of the data section with it; measure what generation adds on top.
    # That readahead is asynchronous: wait until residency stops changing.
    before: dict = {}
    for _ in range(50):
        now = {(layer, e): _resident_fraction(arrs) for layer, e, arrs in _expert_arrays(model)}
        if now == before:
            break
        before = now
        time.sleep(0.1)
    assert sum(f < 0.05 for f in before.values()) > E  # most experts are cold
    store = model.store
    chunks = list(model.generate([5], max_tokens=4, temperature=0))
    assert chunks[-1].stats.decode_tokens == 4
    routed = set(store.routed)
    assert 0 < len(routed) < 3 * E  # decode steps touched some experts, not all
    n_unrouted = 0
    for layer, e, arrs in _expert_arrays(model):
        frac = _resident_fraction(arrs)
        if (layer, e) in routed:
            assert frac > 0.99, (layer, e, frac)
        elif before[(layer, e)] < 0.05:
            n_unrouted += 1
            # nothing of an unrouted expert beyond the pages it shares with a routed neighbour
            assert frac - before[(layer, e)] <= 2 * 3 / (sum(a.nbytes for a in arrs) / PAGE), (layer, e, frac)
    assert n_unrouted > E // 2
    t = store.stats.totals()
    assert t.experts == 3 * 3 * 2  # 3 decode forwards x 3 layers x top-2
    assert t.miss_bytes > 0 and t.hit_bytes + t.miss_bytes == t.expert_bytes
    model.store.close()


def test_max_resident_caps_expert_bytes(moe_path):
    gc.collect()  # models of earlier tests must be unmapped: the kernel keeps mapped pages cached
    evict_file(moe_path)
    one_expert = None
    model = Model.load(moe_path, expert_read="populate", max_resident_gb=1e-9)  # replaced below
    mlp = model.net.blocks[0].mlp
    one_expert = sum(t.w[0].nbytes for t in (mlp.gate, mlp.up, mlp.down))
    budget = 5 * one_expert
    model.store.max_resident = budget
    peak = 0
    for chunk in model.generate([7], max_tokens=12, temperature=0.9, seed=1, top_k=0, top_p=1.0, min_p=0.0):
        resident = sum(_resident_fraction(arrs) * sum(a.nbytes for a in arrs) for _, _, arrs in _expert_arrays(model))
        peak = max(peak, resident)
    slack = 2 * E * len(model.net.blocks) * 3 * PAGE  # partial pages at both ends of every expert range
    assert len(model.store.routed) > 5  # more experts were used than the budget holds
    assert peak <= budget + slack, (peak, budget)
    model.store.close()


class _Fut:
    def __init__(self, done: bool):
        self._done = done

    def done(self) -> bool:
        return self._done

    def result(self):
        return None


class _OrderStore:
    """Stands in for an ExpertStore whose reads of the ``late`` experts have not finished: those
    experts are computed last."""

    def __init__(self, late):
        self.late = set(late)
        self.waited = []

    def prefetch(self, mlp, experts):
        return {int(e): _Fut(int(e) not in self.late) for e in experts}

    def wait(self, fut):
        self.waited.append(fut)


def test_routed_sum_does_not_depend_on_read_order(moe_path):
    # The experts' outputs are summed in expert order whatever order their reads finished in:
    # float32 sums of 4 outputs in another order differ in the last bits, which int8 activations
    # can then turn into a different token. Reference: the sum with no store (expert order).
    model = Model.load(moe_path)
    mlp = model.net.blocks[0].mlp
    rng = np.random.default_rng(3)
    for T in (1, 3):
        x = rng.standard_normal((T, 256)).astype(np.float32)
        sel = np.stack([rng.permutation(E)[:4] for _ in range(T)])
        w = rng.random((T, 4)).astype(np.float32)
        mlp.store = None
        ref = mlp.routed(x, sel, w)
        used = np.unique(sel)
        for late in (used[: len(used) // 2], used[::2], used[1:]):
            mlp.store = _OrderStore(late.tolist())
            got = mlp.routed(x, sel, w)
            assert np.array_equal(got, ref), (T, late, np.abs(got - ref).max())
    mlp.store = model.store
    model.store.close()


def test_pread_into(tmp_path):
    # the GPU cache's staging reads: bytes of the file at an offset, in pieces; past the end an error
    from flashmoe_gguf.expert_store import pread_into
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    p = tmp_path / "f.bin"
    data.tofile(p)
    import os
    fd = os.open(p, os.O_RDONLY)
    try:
        dst = np.zeros(300_001, np.uint8)
        for off in (0, 12345, len(data) - len(dst)):
            pread_into(fd, dst, off)
            assert np.array_equal(dst, data[off:off + len(dst)])
        with pytest.raises(OSError, match="short read"):
            pread_into(fd, dst, len(data) - 10)
    finally:
        os.close(fd)


def test_grouped_expert_products_give_the_per_expert_result(tmp_path):
    # A decode token's experts in three grouped calls (all reads done) or one expert at a time
    # (a read still pending): the same logits bit for bit, so the path taken never changes a
    # token. Q4_K experts (the formats with a grouped product); Q8_0 elsewhere.
    import gguf

    from flashmoe_gguf.arch.moe import MoEMLP
    from flashmoe_gguf.converters.convert import convert
    cfg, sd = random_llama_state(seed=4, hidden=256, ff=256, layers=2, heads=4, kv_heads=2, n_expert=8,
                                 n_expert_used=3)
    f32 = write_state_gguf(cfg, sd, tmp_path / "f32.gguf", "llama", qtype=gguf.GGMLQuantizationType.F32)
    q4k = tmp_path / "q4k.gguf"
    convert(f32, q4k, experts="q4_k", rest="q8_0", progress=False, echo=lambda s: None)
    prompt = np.array([5, 17, 42])

    def run(grouped: bool):
        calls = []
        orig = MoEMLP._routed_grouped

        def spy(self, *a):
            calls.append(1)
            return orig(self, *a)
        m = Model.load(q4k, n_ctx=16)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(MoEMLP, "_routed_grouped", spy)
            if not grouped:
                mp.setattr(MoEMLP, "_grouped", lambda self, futures, used: False)
            m.net.forward(prompt, 0)
            out = [m.net.forward(np.array([t]), 3 + i)[0] for i, t in enumerate((7, 99, 3))]
        m.store.close()
        return out, len(calls)

    a, n_grouped = run(True)
    b, n_plain = run(False)
    assert n_grouped == 3 * 2 and n_plain == 0  # 3 decode tokens x 2 layers
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
