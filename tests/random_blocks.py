"""Random weights in any block format, for kernel tests: random bytes (every quant and sub-scale
pattern occurs) with the scale fields set to sane values, plus edge-case blocks."""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# format name -> byte offsets (within a block) of its f16 scale fields; "e8m0" for MXFP4's
# exponent byte
SCALE_FIELDS = {
    "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,),
    "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,),
    "iq4_nl": (0,), "iq4_xs": (0,), "iq3_xxs": (0,), "iq3_s": (0,), "iq2_xxs": (0,), "iq2_xs": (0,),
    "iq2_s": (0,), "mxfp4": "e8m0",
}


def set_scales(blocks, fields, values):
    """blocks [N, TS] u8; write ``values`` [N] into every scale field."""
    if fields == "e8m0":
        blocks[:, 0] = values
        return
    h = values.astype(np.float16).view(np.uint8).reshape(-1, 2)
    for off in fields:
        blocks[:, off:off + 2] = h


def random_weights(name, rows, cols, rng, edge=True):
    """Random blocks [rows, cols // bs * ts] u8, sane scales, edge-case blocks mixed in."""
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
    nb = rows * cols // bs
    w = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    fields = SCALE_FIELDS[name]
    if fields == "e8m0":
        set_scales(w, fields, rng.integers(118, 130, nb))
    else:
        mag = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), nb))
        set_scales(w, fields, mag * rng.choice([-1.0, 1.0], nb))
    if edge and nb >= 8:
        k = rng.choice(nb, 6, replace=False)
        w[k[0]] = 0  # all zero
        w[k[1]] = 0xFF  # extreme quants
        w[k[2]] = 0x00
        for j in (1, 2):
            set_scales(w[k[j]:k[j] + 1], fields, np.array([0.05 if fields != "e8m0" else 127]))
        if fields != "e8m0":
            edge_scales = [0.0, -0.07, 6e-8]  # zero, negative, subnormal half
        else:
            edge_scales = [0, 1, 160]  # the two subnormal-float exponents, a large one
        for j, v in enumerate(edge_scales):
            set_scales(w[k[3 + j]:k[3 + j] + 1], fields, np.array([v]))
    w = w.reshape(rows, cols // bs * ts)
    w.setflags(write=False)  # as the runtime passes them (views of a read-only mmap)
    return w
