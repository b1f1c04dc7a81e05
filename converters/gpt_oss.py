"""gpt-oss checkpoints (``GptOssForCausalLM``) as llama.cpp's ``gpt-oss``.

Layout (as llama.cpp's convert_hf_to_gguf.py writes it):
* Metadata: the common keys without rope.dimension_count (it defaults to key_length = head_dim),
  YaRN (type, factor, original context, beta_fast, beta_slow), attention.sliding_window,
  expert_feed_forward_length = intermediate_size.
* self_attn.sinks -> attn_sinks.weight; mlp.router -> ffn_gate_inp (.weight, .bias);
  post_attention_layernorm -> post_attention_norm; q/k/v/o projections with their biases.
* Experts: the rows of gate_up (its output features) interleave gate (even) and up (odd), in the
  weights and in gate_up_proj_bias [E, 2F]. Unquantized: gate_up_proj [E, D, 2F] and down_proj
  [E, F, D] are stored input-major and are transposed to ffn_{gate,up}_exps [E, F, D] and
  ffn_down_exps [E, D, F].
* MXFP4 (the released checkpoints): ``*_blocks`` [E, rows, cols/32, 16] and ``*_scales``
  [E, rows, cols/32] are already output-major (no transpose). A block's scale byte (e8m0) is
  copied unchanged; its 16 bytes hold the 32 e2m1 codes in adjacent pairs (element 2j in the low
  nibble of byte j, 2j+1 in the high one), which ggml stores as element j low, j+16 high.
  ``--experts keep`` (or ``mxfp4``) copies them as MXFP4; another type dequantizes and requantizes.

E = experts, F = expert width, D = hidden size.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from . import codec
from .errors import ConvertError
from .parts import ArrayPart, Part
from .plan import TensorPlan
from .safetensors_io import SafetensorsIndex, STensor
from .source import Source, recorder
from .vocab import add_vocab

ARCHITECTURES = ("GptOssForCausalLM",)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

_PLAIN = {  # per-layer HF name -> GGUF suffix
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.sinks": "attn_sinks.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
    **{f"self_attn.{hf}_proj.{k}": f"{gg}.{k}" for hf, gg in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"),
                                                               ("o", "attn_output")) for k in ("weight", "bias")},
}


def hf_mxfp4_to_ggml(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF MXFP4 blocks [..., nb, 16] and scales [..., nb] (uint8) -> ggml MXFP4 bytes [..., nb * 17]."""
    lo, hi = blocks & 0x0F, blocks >> 4  # codes of elements 2j, 2j+1
    codes = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)  # element order
    out = np.empty((*blocks.shape[:-1], 17), dtype=np.uint8)
    out[..., 0] = scales
    out[..., 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(*blocks.shape[:-2], -1)


class Mxfp4Part(Part):
    """Rows of an HF MXFP4 tensor (blocks [R, nb, 16], scales [R, nb]) in ggml's MXFP4."""

    def __init__(self, blocks: np.ndarray, scales: np.ndarray, release: Callable[[], None] | None = None):
        assert blocks.shape[:-1] == scales.shape and blocks.shape[-1] == 16
        self.blocks, self.scales = blocks, scales
        self.rows, self.cols = blocks.shape[0], blocks.shape[1] * 32
        self.native = Q.MXFP4
        self.src_nbytes = blocks.nbytes + scales.nbytes
        self._release = release

    def raw(self, sel) -> np.ndarray:
        return hf_mxfp4_to_ggml(self.blocks[sel], self.scales[sel])

    def floats(self, sel) -> np.ndarray:
        return codec.decode(self.raw(sel), Q.MXFP4, self.cols)

    def release(self) -> None:
        if self._release is not None:
            self._release()


def open_gpt_oss(folder: Path, cfg: dict[str, Any], hf_arch: str, part: Callable[..., ArrayPart],
                 add_model_card: Callable) -> Source:
    cfg_path = folder / "config.json"

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ConvertError(f"{cfg_path}: {key} is missing")
        return cfg[key]

    n_layer, n_embd = int(need("num_hidden_layers")), int(need("hidden_size"))
    n_head, n_head_kv = int(need("num_attention_heads")), int(need("num_key_value_heads"))
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    n_ff, n_expert = int(need("intermediate_size")), int(need("num_local_experts"))
    n_vocab = cfg.get("vocab_size")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 150000.0))

    w = recorder("gpt-oss")
    w.add_type(gguf.GGUFType.MODEL)
    add_model_card(w, folder)
    w.add_block_count(n_layer)
    if cfg.get("max_position_embeddings") is not None:
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
        w.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))
    elif rope_type not in (None, "default"):
        raise ConvertError(f"{cfg_path}: rope type {rope_type!r} is not supported for gpt-oss")
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_expert_count(n_expert)
    w.add_expert_used_count(int(need("num_experts_per_tok")))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_sliding_window(int(need("sliding_window")))
    w.add_expert_feed_forward_length(n_ff)
    w.add_file_type(0)  # set once the tensor types are chosen
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, folder, "bpe", int(n_vocab) if n_vocab is not None else None)

    src = Source(str(folder), "gpt-oss", dict(w.kv_data[0]), [], n_layer=n_layer, n_head=n_head,
                 n_head_kv=n_head_kv, n_embd=n_embd, n_ff=n_ff, kind="hf")
    index = SafetensorsIndex(folder)
    src.plan = _tensors(index, part, n_layer, n_expert, n_ff, n_embd, bool(cfg.get("tie_word_embeddings")))
    return src


def _tensors(index: SafetensorsIndex, part: Callable[..., ArrayPart], n_layer: int, E: int, F: int, D: int,
             tied: bool) -> list[TensorPlan]:
    plans: dict[str, TensorPlan] = {}
    T = index.tensors

    def add(name: str, shape: tuple[int, ...], parts: list[Part]) -> None:
        t = TensorPlan(name, shape, parts)
        t.check()
        plans[name] = t

    def floats_of(hf: str, st: STensor) -> np.ndarray:
        if st.dtype not in ("F32", "F16", "BF16"):
            raise ConvertError(f"{st.file.path}: tensor {hf} has dtype {st.dtype}; expected F32, F16 or BF16")
        return st.array()

    def mxfp4(hf: str, rows: int, cols: int) -> np.ndarray:
        """ggml-ordered check of an HF MXFP4 pair; returns (blocks, scales) storage views."""
        bl, sc = T[hf + "_blocks"], T.get(hf + "_scales")
        if sc is None:
            raise ConvertError(f"{index.folder}: {hf}_blocks has no {hf}_scales")
        if bl.dtype != "U8" or sc.dtype != "U8" or bl.shape != (E, rows, cols // 32, 16) or sc.shape != bl.shape[:-1]:
            raise ConvertError(f"{index.folder}: {hf}_blocks/_scales have shapes {list(bl.shape)}/{list(sc.shape)} "
                               f"({bl.dtype}/{sc.dtype}), expected U8 {[E, rows, cols // 32, 16]}/{[E, rows, cols // 32]}")
        return bl, sc

    for hf, st in T.items():
        if hf.endswith("_scales"):
            continue
        shape = tuple(st.shape) if st.shape else (1,)
        if hf == "model.embed_tokens.weight":
            add("token_embd.weight", shape, [part(st, floats_of(hf, st))])
            continue
        if hf == "lm_head.weight":
            if not tied:
                add("output.weight", shape, [part(st, floats_of(hf, st))])
            continue
        if hf == "model.norm.weight":
            add("output_norm.weight", shape, [part(st, floats_of(hf, st))])
            continue
        m = _LAYER_RE.match(hf)
        if not m or int(m.group(1)) >= n_layer:
            raise ConvertError(f"{index.folder}: tensor {hf} has no GGUF name for gpt-oss")
        b, key = f"blk.{m.group(1)}", m.group(2)
        if key in _PLAIN:
            add(f"{b}.{_PLAIN[key]}", shape, [part(st, floats_of(hf, st))])
        elif key == "mlp.experts.gate_up_proj_blocks":
            bl, sc = mxfp4(hf[: -len("_blocks")], 2 * F, D)
            blocks, scales = bl.storage(), sc.storage()
            for sfx, k in (("gate", 0), ("up", 1)):
                add(f"{b}.ffn_{sfx}_exps.weight", (E, F, D),
                    [Mxfp4Part(blocks[e, k::2], scales[e, k::2], bl.release) for e in range(E)])
        elif key == "mlp.experts.down_proj_blocks":
            bl, sc = mxfp4(hf[: -len("_blocks")], D, F)
            blocks, scales = bl.storage(), sc.storage()
            add(f"{b}.ffn_down_exps.weight", (E, D, F), [Mxfp4Part(blocks[e], scales[e], bl.release) for e in range(E)])
        elif key == "mlp.experts.gate_up_proj":  # [E, D, 2F], input-major
            arr = floats_of(hf, st)
            if arr.shape != (E, D, 2 * F):
                raise ConvertError(f"{index.folder}: tensor {hf} has shape {list(arr.shape)}, expected {[E, D, 2 * F]}")
            for sfx, k in (("gate", 0), ("up", 1)):
                add(f"{b}.ffn_{sfx}_exps.weight", (E, F, D), [part(st, arr[e, :, k::2].T) for e in range(E)])
        elif key == "mlp.experts.down_proj":  # [E, F, D], input-major
            arr = floats_of(hf, st)
            if arr.shape != (E, F, D):
                raise ConvertError(f"{index.folder}: tensor {hf} has shape {list(arr.shape)}, expected {[E, F, D]}")
            add(f"{b}.ffn_down_exps.weight", (E, D, F), [part(st, arr[e].T) for e in range(E)])
        elif key == "mlp.experts.gate_up_proj_bias":  # [E, 2F]
            arr = floats_of(hf, st)
            for sfx, k in (("gate", 0), ("up", 1)):
                add(f"{b}.ffn_{sfx}_exps.bias", (E, F), [part(st, arr[:, k::2])])
        elif key == "mlp.experts.down_proj_bias":  # [E, D]
            add(f"{b}.ffn_down_exps.bias", shape, [part(st, floats_of(hf, st))])
        else:
            raise ConvertError(f"{index.folder}: tensor {hf} has no GGUF name for gpt-oss")

    for t in plans.values():
        natives = {p.native for p in t.parts}
        t.source_qtype = natives.pop() if len(natives) == 1 else None

    def order(t: TensorPlan) -> tuple:
        m = re.match(r"^blk\.(\d+)\.", t.name)
        if m:
            return (1, int(m.group(1)), t.name)
        return (0 if t.name.startswith("token_embd") else 2, 0, t.name)

    return sorted(plans.values(), key=order)
