"""DeepSeek-V2/V3/R1 and Kimi-K2 checkpoints (``DeepseekV3ForCausalLM``, ``DeepseekV2ForCausalLM``)
as llama.cpp's ``deepseek2``.

Layout (as llama.cpp's convert_hf_to_gguf.py writes it):
* Metadata: head_count_kv = 1 (MLA runs as MQA over the latent), key_length = kv_lora_rank +
  qk_rope_head_dim, value_length = kv_lora_rank, key_length_mla = qk_nope + qk_rope,
  value_length_mla = v_head_dim, rope.dimension_count = qk_rope_head_dim; leading dense layers,
  expert groups, gating function (2 = sigmoid), routed scaling, YaRN with
  yarn_log_multiplier = 0.1 * mscale_all_dim.
* kv_b_proj [H*(Kn+V), C] is split per head: attn_k_b = k_b transposed (numpy [H, C, Kn]),
  attn_v_b = v_b (numpy [H, V, C]); the runtime caches the latent, not full K/V.
* mlp.gate.e_score_correction_bias -> exp_probs_b.bias; shared_experts -> *_shexp; no RoPE
  permutation (DeepSeek rotates adjacent pairs, as ggml does). The multi-token-prediction layers
  (indices >= num_hidden_layers) are skipped.
* FP8 checkpoints (DeepSeek-V3/R1 as released): each float8 e4m3 weight W comes with
  ``W_scale_inv`` [ceil(R/128), ceil(C/128)]; the value is W * scale_inv (despite the name), the
  scale repeated over its 128x128 block. Dequantized when written, a chunk of rows at a time.

H = heads, C = kv_lora_rank, Kn = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim,
E = routed experts, F = expert width, D = hidden size.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from .errors import ConvertError
from .parts import ArrayPart, Part, RowPermuted
from .plan import TensorPlan
from .safetensors_io import SafetensorsIndex, STensor, f8_e4m3_to_f32
from .source import Source, recorder
from .vocab import add_vocab

ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")

_PLAIN = {  # per-layer HF name -> GGUF suffix
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}


class Fp8Part(Part):
    """A float8 e4m3 weight [R, C] with its block scales [ceil(R/br), ceil(C/bc)]; rows are
    dequantized when read (any selection, so the writer's chunks bound the memory)."""

    def __init__(self, w: STensor, scale: Part, block: tuple[int, int]):
        self.w, self.scale_part = w, scale
        self.bits = w.storage().reshape(w.shape[0], -1)  # [R, C] uint8
        self.rows, self.cols = self.bits.shape
        self.br, self.bc = block
        want = (-(-self.rows // self.br), -(-self.cols // self.bc))
        if (scale.rows, scale.cols) != want:
            raise ConvertError(f"{w.file.path}: {w.name}_scale_inv has shape {[scale.rows, scale.cols]}, expected "
                               f"{list(want)} for blocks of {list(block)}")
        self.native = None
        self.src_nbytes = w.nbytes
        self._scale: np.ndarray | None = None  # [ceil(R/br), ceil(C/bc)] f32, read when first needed

    def floats(self, sel) -> np.ndarray:
        if self._scale is None:
            self._scale = self.scale_part.floats(slice(None))
        rows = np.arange(self.rows)[sel]
        x = f8_e4m3_to_f32(self.bits[rows])  # [n, C]
        s = np.repeat(self._scale[rows // self.br], self.bc, axis=1)[:, : self.cols]  # [n, C]
        return x * s

    def release(self) -> None:
        self._scale = None
        self.w.release()
        self.scale_part.release()


class _Computed(Part):
    """Rows computed from another part when first read (a transposed per-head slice)."""

    def __init__(self, rows: int, cols: int, fn: Callable[[], np.ndarray], src_nbytes: int = 0):
        self.rows, self.cols, self.fn = rows, cols, fn
        self.native = None
        self.src_nbytes = src_nbytes
        self._cache: np.ndarray | None = None

    def floats(self, sel) -> np.ndarray:
        if self._cache is None:
            self._cache = np.ascontiguousarray(self.fn(), dtype=np.float32)
            assert self._cache.shape == (self.rows, self.cols)
        return self._cache[sel]

    def release(self) -> None:
        self._cache = None


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = cfg.get("rope_theta", 10000.0)
    return rope


def open_deepseek2(folder: Path, cfg: dict[str, Any], hf_arch: str, part: Callable[..., ArrayPart],
                   add_model_card: Callable) -> Source:
    cfg_path = folder / "config.json"

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ConvertError(f"{cfg_path}: {key} is missing")
        return cfg[key]

    n_layer, n_embd = int(need("num_hidden_layers")), int(need("hidden_size"))
    H, C = int(need("num_attention_heads")), int(need("kv_lora_rank"))
    R, Kn, V = int(need("qk_rope_head_dim")), int(need("qk_nope_head_dim")), int(need("v_head_dim"))
    n_vocab = int(need("vocab_size"))
    n_expert = int(need("n_routed_experts"))
    rope = _rope(cfg)
    scoring = cfg.get("scoring_func", "sigmoid" if hf_arch == "DeepseekV3ForCausalLM" else "softmax")
    gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}.get(scoring)
    if gating is None:
        raise ConvertError(f"{cfg_path}: scoring_func {scoring!r} is not supported")

    w = recorder("deepseek2")
    w.add_type(gguf.GGUFType.MODEL)
    add_model_card(w, folder)
    w.add_block_count(n_layer)
    if cfg.get("max_position_embeddings") is not None:
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(int(need("intermediate_size")))
    w.add_head_count(H)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_expert_count(n_expert)
    w.add_expert_used_count(int(need("num_experts_per_tok")))
    if cfg.get("n_group"):
        w.add_expert_group_count(int(cfg["n_group"]))
        w.add_expert_group_used_count(int(need("topk_group")))
    w.add_expert_gating_func(gating)
    w.add_leading_dense_block_count(int(cfg.get("first_k_dense_replace", 0)))
    w.add_vocab_size(n_vocab)
    if cfg.get("q_lora_rank") is not None:
        w.add_q_lora_rank(int(cfg["q_lora_rank"]))
    w.add_kv_lora_rank(C)
    w.add_head_count_kv(1)
    w.add_key_length(C + R)
    w.add_value_length(C)
    w.add_key_length_mla(Kn + R)
    w.add_value_length_mla(V)
    w.add_expert_feed_forward_length(int(need("moe_intermediate_size")))
    w.add_expert_shared_count(int(cfg.get("n_shared_experts") or 0))
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(R)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
        if rope.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))
    elif rope_type not in (None, "default"):
        raise ConvertError(f"{cfg_path}: rope type {rope_type!r} is not supported for deepseek2")
    w.add_file_type(0)  # set once the tensor types are chosen
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, folder, "bpe", n_vocab)

    qc = cfg.get("quantization_config") or {}
    block = tuple(int(b) for b in (qc.get("weight_block_size") or (128, 128)))
    src = Source(str(folder), "deepseek2", dict(w.kv_data[0]), [], n_layer=n_layer, n_head=H, n_head_kv=1,
                 n_embd=n_embd, n_ff=int(cfg["intermediate_size"]), kind="hf")
    index = SafetensorsIndex(folder)
    src.plan = _tensors(index, part, n_layer, H, Kn, V, C, n_expert, block, bool(cfg.get("tie_word_embeddings")))
    return src


def _tensors(index: SafetensorsIndex, part: Callable[..., ArrayPart], n_layer: int, H: int, Kn: int, V: int,
             C: int, n_expert: int, block: tuple[int, int], tied: bool) -> list[TensorPlan]:
    plans: dict[str, TensorPlan] = {}
    experts: dict[str, dict[int, Part]] = {}
    skipped = 0

    def weight(hf: str, st: STensor) -> Part:
        if st.dtype == "F8_E4M3":
            s = index.tensors.get(hf + "_scale_inv")
            if s is None or len(st.shape) != 2:
                raise ConvertError(f"{st.file.path}: FP8 tensor {hf} has no {hf}_scale_inv (block scales)")
            return Fp8Part(st, part(s), block)
        if st.dtype not in ("F32", "F16", "BF16"):
            raise ConvertError(f"{st.file.path}: tensor {hf} has dtype {st.dtype}; only F32, F16, BF16 and "
                               "F8_E4M3 (with block scales) can be converted")
        return part(st)

    def add(name: str, shape: tuple[int, ...], parts: list[Part]) -> None:
        t = TensorPlan(name, shape, parts)
        t.check()
        plans[name] = t

    for hf, st in index.tensors.items():
        if hf.endswith(("_scale_inv", ".rotary_emb.inv_freq")):
            continue
        shape = tuple(st.shape) if st.shape else (1,)
        if hf == "model.embed_tokens.weight":
            add("token_embd.weight", shape, [weight(hf, st)])
            continue
        if hf == "lm_head.weight":
            if not tied:
                add("output.weight", shape, [weight(hf, st)])
            continue
        if hf == "model.norm.weight":
            add("output_norm.weight", shape, [weight(hf, st)])
            continue
        m = _LAYER_RE.match(hf)
        if not m:
            raise ConvertError(f"{index.folder}: tensor {hf} has no GGUF name for deepseek2")
        layer, key = int(m.group(1)), m.group(2)
        if layer >= n_layer:  # the multi-token-prediction layers
            skipped += 1
            continue
        b = f"blk.{layer}"
        if key in _PLAIN:
            add(f"{b}.{_PLAIN[key]}", shape, [weight(hf, st)])
        elif key == "self_attn.kv_b_proj.weight":
            if shape != (H * (Kn + V), C):
                raise ConvertError(f"{index.folder}: tensor {hf} has shape {list(shape)}, config.json implies "
                                   f"{[H * (Kn + V), C]}")
            kv_b = weight(hf, st)
            k_b = [_Computed(C, Kn, lambda h=h, kv=kv_b: kv.floats(slice(h * (Kn + V), h * (Kn + V) + Kn)).T,
                             kv_b.src_nbytes * Kn // (H * (Kn + V))) for h in range(H)]
            add(f"{b}.attn_k_b.weight", (H, C, Kn), k_b)  # [H, C, Kn]
            v_rows = (np.arange(H)[:, None] * (Kn + V) + Kn + np.arange(V)[None, :]).reshape(-1)
            add(f"{b}.attn_v_b.weight", (H, V, C), [RowPermuted(kv_b, v_rows)])  # [H, V, C]
        elif key in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # fused [E, 2F, D] / [E, D, F]
            if len(shape) != 3:
                raise ConvertError(f"{index.folder}: tensor {hf} has shape {list(shape)}, expected 3-D")
            arr = st.array()
            E = shape[0]
            if key.endswith("down_proj"):
                add(f"{b}.ffn_down_exps.weight", shape, [part(st, arr[e]) for e in range(E)])
            else:
                F = shape[1] // 2
                for sfx, sl in (("gate", slice(0, F)), ("up", slice(F, 2 * F))):
                    add(f"{b}.ffn_{sfx}_exps.weight", (E, F, shape[2]), [part(st, arr[e, sl]) for e in range(E)])
        elif (me := _EXPERT_RE.match(key)):
            experts.setdefault(f"{b}.ffn_{me.group(2)}_exps.weight", {})[int(me.group(1))] = weight(hf, st)
        else:
            raise ConvertError(f"{index.folder}: tensor {hf} has no GGUF name for deepseek2")

    for name, by_id in experts.items():
        if sorted(by_id) != list(range(n_expert)):
            raise ConvertError(f"{index.folder}: {name}: expert tensors missing or extra "
                               f"(config.json says {n_expert} experts, found {len(by_id)})")
        first = by_id[0]
        if any((p.rows, p.cols) != (first.rows, first.cols) for p in by_id.values()):
            raise ConvertError(f"{index.folder}: {name}: experts of different shapes")
        add(name, (n_expert, first.rows, first.cols), [by_id[i] for i in range(n_expert)])

    if skipped:
        print(f"{index.folder}: skipping {skipped} tensors of the multi-token-prediction layers", file=sys.stderr)
    for t in plans.values():
        natives = {p.native for p in t.parts}
        t.source_qtype = natives.pop() if len(natives) == 1 else None

    def order(t: TensorPlan) -> tuple:
        m = re.match(r"^blk\.(\d+)\.", t.name)
        if m:
            return (1, int(m.group(1)), t.name)
        return (0 if t.name.startswith("token_embd") else 2, 0, t.name)

    return sorted(plans.values(), key=order)
