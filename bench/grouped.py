"""CPU MoE decode with the grouped expert products against one product per expert, side by side.

    python bench/grouped.py [--hidden 2048] [--ff 768] [--experts 128] [--top-k 8] [--layers 8]
                            [--tokens 10] [--reps 6]

Writes a synthetic llama MoE (Q4_K experts, Q8_0 rest; default: Qwen3-30B-A3B's layer shape,
8 layers) under models/bench/, then alternates runs of ``--tokens`` decode steps with the
grouped products (``matvec_ids``) and without them in one process; prints tok/s per run, the
medians and their ratio. Both paths give the same logits bit for bit (tests/test_expert_store.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--reps", type=int, default=6)
    a = ap.parse_args()
    from gpu import write_synthetic_moe

    from flashmoe_gguf import Model
    from flashmoe_gguf.arch.moe import MoEMLP
    path = ROOT / "models" / "bench" / f"grouped-{a.hidden}-{a.ff}-{a.experts}x{a.top_k}-{a.layers}L.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_moe(str(path), a.hidden, a.hidden // 128, max(1, a.hidden // 512), a.ff, a.experts,
                            a.top_k, a.layers, 32000, "Q4_K", "Q8_0")
    need = 8 + 2 * a.reps * a.tokens
    m = Model.load(path, n_ctx=need + 8)
    net = m.net
    toks = np.arange(10, 10 + need) % 32000
    net.forward(toks[:4], 0)
    pos = 4
    for _ in range(4):  # compile, warm the page cache
        net.forward(toks[pos:pos + 1], pos)
        pos += 1
    grouped = MoEMLP._grouped
    res: dict = {"grouped": [], "per_expert": []}
    for _ in range(a.reps):
        for name in res:
            MoEMLP._grouped = grouped if name == "grouped" else (lambda self, futures, used: False)
            t = time.perf_counter()
            for _ in range(a.tokens):
                net.forward(toks[pos:pos + 1], pos)
                pos += 1
            res[name].append(round(a.tokens / (time.perf_counter() - t), 2))
    MoEMLP._grouped = grouped
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"{path.name}: decode tok/s per run {res}")
    print(f"medians: grouped {med['grouped']:.2f}, per expert {med['per_expert']:.2f}, "
          f"ratio {med['grouped'] / med['per_expert']:.3f}")


if __name__ == "__main__":
    main()
