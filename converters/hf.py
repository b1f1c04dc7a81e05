"""Hugging Face folders (config.json, safetensors shards, tokenizer files) as a conversion source.

Names go through ``gguf.TensorNameMap``; per-expert tensors (``...experts.N.w1`` or
``...experts.N.gate_proj``) are stacked into llama.cpp's ``blk.L.ffn_{gate,up,down}_exps`` tensors
(numpy shape [E, rows, cols], one part per expert, read when written); fused expert tensors
(``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F]) are split the same way.
For the llama architecture the rows of q/k are reordered from HF's rotate-half layout to ggml's
adjacent pairs (llama.cpp's ``permute``). Metadata keys follow llama.cpp's convert_hf_to_gguf.py.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

from .errors import ConvertError
from .parts import ArrayPart, ColPermuted, Part, RowPermuted
from .plan import TensorPlan
from .safetensors_io import SafetensorsIndex, STensor
from .source import Source, recorder
from .vocab import add_vocab


@dataclass(frozen=True)
class Family:
    arch: str  # GGUF architecture
    vocab: str  # "llama" | "qwen" | "bpe" (see vocab.add_vocab)
    permute_qk: bool
    moe: bool


ARCHITECTURES = {
    "LlamaForCausalLM": Family("llama", "llama", True, False),
    "MistralForCausalLM": Family("llama", "llama", True, False),
    "MixtralForCausalLM": Family("llama", "llama", True, True),
    "Qwen2ForCausalLM": Family("qwen2", "qwen", False, False),
    "Qwen3ForCausalLM": Family("qwen3", "qwen", False, False),
    "Qwen2MoeForCausalLM": Family("qwen2moe", "bpe", False, True),
    "Qwen3MoeForCausalLM": Family("qwen3moe", "bpe", False, True),
    "OlmoeForCausalLM": Family("olmoe", "bpe", False, True),
}

_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
_EXPERT_RE = re.compile(r"^(?P<pre>.*\.experts)\.(?P<x>\d+)\.(?P<post>.+)$")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def _arch_id(name: str) -> gguf.MODEL_ARCH:
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)


def qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order that turns HF's q/k (per head: first halves, then second halves of the rotated
    pairs) into ggml's adjacent pairs: out[h, j, t] = in[h, t, j]."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def load_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not folder.exists():
        raise ConvertError(f"{folder}: no such file or folder")
    if not cfg_path.is_file():
        raise ConvertError(f"{folder}: config.json is missing (not a Hugging Face model folder)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{cfg_path}: cannot read ({e})") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{cfg_path}: not a JSON object")
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    return cfg


class _Hp:
    """config.json values, looked up under their several names."""

    def __init__(self, cfg: dict[str, Any], path: Path):
        self.cfg, self.path = cfg, path

    def get(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if self.cfg.get(k) is not None:
                return self.cfg[k]
        return default

    def need(self, *keys: str) -> Any:
        v = self.get(*keys)
        if v is None:
            raise ConvertError(f"{self.path}: {keys[0]} is missing")
        return v


def open_hf(folder: str | Path) -> Source:
    folder = Path(folder)
    cfg = load_config(folder)
    cfg_path = folder / "config.json"
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs else None
    from . import deepseek2, gpt_oss, qwen35

    if hf_arch in qwen35.ARCHITECTURES:
        return qwen35.open_qwen35(folder, cfg, hf_arch, _part, _add_model_card)
    if hf_arch in deepseek2.ARCHITECTURES:
        return deepseek2.open_deepseek2(folder, cfg, hf_arch, _part, _add_model_card)
    if hf_arch in gpt_oss.ARCHITECTURES:
        return gpt_oss.open_gpt_oss(folder, cfg, hf_arch, _part, _add_model_card)
    if hf_arch not in ARCHITECTURES:
        supported = [*ARCHITECTURES, *qwen35.ARCHITECTURES, *deepseek2.ARCHITECTURES, *gpt_oss.ARCHITECTURES]
        raise ConvertError(f"{cfg_path}: unsupported architecture {hf_arch!r} "
                           f"(supported: {', '.join(sorted(supported))})")
    fam = ARCHITECTURES[hf_arch]
    hp = _Hp(cfg, cfg_path)
    n_layer = int(hp.need("num_hidden_layers", "n_layers", "n_layer", "num_layers"))
    n_embd = int(hp.need("hidden_size", "n_embd", "dim"))
    n_head = int(hp.need("num_attention_heads", "n_head", "n_heads"))
    n_head_kv = int(hp.get("num_key_value_heads", "n_kv_heads", default=n_head))
    head_dim = int(hp.get("head_dim", default=n_embd // n_head))
    n_ff = int(hp.get("intermediate_size", default=0))
    n_vocab = hp.get("vocab_size")
    index = SafetensorsIndex(folder)

    # -------------------------------------------------------------- metadata (llama.cpp's order)
    w = recorder(fam.arch)
    w.add_type(gguf.GGUFType.MODEL)
    _add_model_card(w, folder)
    w.add_block_count(n_layer)
    if (n_ctx := hp.get("max_position_embeddings", "n_ctx", "n_positions", "max_length")) is not None:
        w.add_context_length(int(n_ctx))
    w.add_embedding_length(n_embd)
    if n_ff:
        w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    if hp.get("num_key_value_heads", "n_kv_heads") is not None:
        w.add_head_count_kv(n_head_kv)
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "rope_theta" not in rope and hp.get("rope_theta", "rotary_emb_base") is not None:
        rope["rope_theta"] = hp.get("rope_theta", "rotary_emb_base")
    rope_type = rope.get("rope_type", rope.get("type"))
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in (None, "default", "llama3"):
        raise ConvertError(f"{cfg_path}: rope type {rope_type!r} is not supported by this converter")
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    eps = hp.get("rms_norm_eps", "norm_eps")
    if fam.arch == "olmoe":
        eps = 1e-5  # llama.cpp writes OLMoE's epsilon as 1e-5 whatever the config says
    if eps is not None:
        w.add_layer_norm_rms_eps(float(eps))
    n_expert = hp.get("num_local_experts", "num_experts", "n_routed_experts")
    if n_expert is not None:
        w.add_expert_count(int(n_expert))
    if (n_used := hp.get("num_experts_per_tok", "num_experts_per_token")) is not None:
        w.add_expert_used_count(int(n_used))
    if cfg.get("head_dim") is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(0)  # set once the tensor types are chosen
    if fam.arch == "llama":
        if n_vocab is not None:
            w.add_vocab_size(int(n_vocab))
        w.add_rope_dimension_count(head_dim)
    if fam.arch in ("qwen2moe", "qwen3moe"):
        if (f := hp.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(int(f))
        if (f := hp.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(int(f))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, folder, fam.vocab, int(n_vocab) if n_vocab is not None else None)

    src = Source(str(folder), fam.arch, dict(w.kv_data[0]), [], n_layer=n_layer, n_head=n_head,
                 n_head_kv=n_head_kv, n_embd=n_embd, n_ff=n_ff, kind="hf")
    n_ff_exp = int(hp.get("moe_intermediate_size", default=n_ff))
    n_ff_sh = int(hp.get("shared_expert_intermediate_size", default=0))
    expected = _expected_shapes(fam, n_embd, n_head, n_head_kv, head_dim, n_ff, n_ff_exp, n_ff_sh,
                                int(n_expert or 0), int(n_vocab) if n_vocab is not None else None)
    src.plan = _tensors(index, fam, n_layer, n_head, n_head_kv, int(n_expert or 0), expected)
    if rope_type == "llama3" and fam.arch == "llama":
        src.plan.insert(0, _llama3_rope_freqs(rope, head_dim))
    return src


def _add_model_card(w, folder: Path) -> None:
    """general.name, basename, finetune, license... as llama.cpp derives them (gguf.Metadata: the
    model card, config.json's _name_or_path, the folder name); the size label is set later."""
    import logging

    logging.getLogger("gguf.metadata").setLevel(logging.ERROR)
    try:
        meta = gguf.Metadata.load(None, folder.resolve(), None, 0)
    except Exception:  # noqa: BLE001 - a malformed model card must not stop a conversion
        meta = gguf.Metadata()
    if meta.name is None:
        meta.name = folder.resolve().name
    meta.size_label = None
    meta.set_gguf_meta_model(w)


def _expected_shapes(fam: Family, D: int, H: int, Hkv: int, K: int, F: int, Fe: int, Fs: int, E: int,
                     V: int | None) -> dict[str, tuple[int, ...]]:
    """numpy shapes implied by config.json, by GGUF name without the block prefix (per expert for *_exps)."""
    e: dict[str, tuple[int, ...]] = {
        "output_norm.weight": (D,), "attn_norm.weight": (D,), "ffn_norm.weight": (D,),
        "attn_q.weight": (H * K, D), "attn_k.weight": (Hkv * K, D), "attn_v.weight": (Hkv * K, D),
        "attn_output.weight": (D, H * K), "attn_q.bias": (H * K,), "attn_k.bias": (Hkv * K,),
        "attn_v.bias": (Hkv * K,),
    }
    if V is not None:
        e["token_embd.weight"] = (V, D)
        e["output.weight"] = (V, D)
    if fam.arch == "olmoe":
        e["attn_q_norm.weight"], e["attn_k_norm.weight"] = (H * K,), (Hkv * K,)
    else:
        e["attn_q_norm.weight"] = e["attn_k_norm.weight"] = (K,)
    if F:
        e["ffn_gate.weight"] = e["ffn_up.weight"] = (F, D)
        e["ffn_down.weight"] = (D, F)
    if E:
        e["ffn_gate_inp.weight"] = (E, D)
        e["ffn_gate_exps.weight"] = e["ffn_up_exps.weight"] = (Fe, D)
        e["ffn_down_exps.weight"] = (D, Fe)
    if Fs:
        e["ffn_gate_shexp.weight"] = e["ffn_up_shexp.weight"] = (Fs, D)
        e["ffn_down_shexp.weight"] = (D, Fs)
        e["ffn_gate_inp_shexp.weight"] = (1, D)
    return e


def _part(st: STensor, arr: np.ndarray | None = None) -> ArrayPart:
    """A part reading ``arr`` (default: the whole tensor, as 2-D) of safetensors tensor ``st``."""
    a = st.array() if arr is None else arr
    if a.ndim == 0:
        a = a.reshape(1)
    a2 = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)
    if arr is None:
        return ArrayPart(a2, st.native, st.release)
    # a sub-view: release just its bytes
    base = st.array()
    off = st.offset + (a.__array_interface__["data"][0] - base.__array_interface__["data"][0])
    return ArrayPart(a2, st.native, lambda f=st.file, o=off, n=a.nbytes: f.release(o, n))


def _tensors(index: SafetensorsIndex, fam: Family, n_layer: int, n_head: int, n_head_kv: int, n_expert: int,
             expected: dict[str, tuple[int, ...]]) -> list[TensorPlan]:
    tmap = gguf.get_tensor_name_map(_arch_id(fam.arch), n_layer)
    plans: dict[str, TensorPlan] = {}
    experts: dict[str, dict[int, STensor]] = {}  # GGUF name -> expert id -> tensor
    where: dict[str, str] = {}  # GGUF name -> HF name, for messages

    def gguf_name(hf: str) -> str:
        n = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if n is None:
            raise ConvertError(f"{index.folder}: tensor {hf} has no GGUF name for architecture {fam.arch}")
        return n

    def check_shape(name: str, hf: str, shape: tuple[int, ...]) -> None:
        key = _BLOCK_RE.sub("", name)
        want = expected.get(key)
        if want is not None and tuple(shape) != want:
            raise ConvertError(f"{index.folder}: tensor {hf} has shape {list(shape)}, but config.json implies "
                               f"{list(want)}")

    for hf, st in index.tensors.items():
        if hf.endswith(_SKIP_SUFFIXES):
            continue
        m = _EXPERT_RE.match(hf)
        if m:
            name = gguf_name(f"{m['pre']}.{m['post']}")
            experts.setdefault(name, {})[int(m["x"])] = st
            where[name] = f"{m['pre']}.*.{m['post']}"
            continue
        if hf.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):  # fused [E, ...] tensors
            if len(st.shape) != 3:
                raise ConvertError(f"{index.folder}: tensor {hf} has shape {list(st.shape)}, expected 3-D")
            arr = st.array()
            E = st.shape[0]
            if hf.endswith("down_proj"):
                name = gguf_name(hf + ".weight")
                for e_ in range(E):
                    check_shape(name, hf, arr[e_].shape)
                plans[name] = TensorPlan(name, tuple(st.shape), [_part(st, arr[e_]) for e_ in range(E)])
            else:
                if st.shape[1] % 2:
                    raise ConvertError(f"{index.folder}: tensor {hf} has an odd row count {st.shape[1]}")
                F = st.shape[1] // 2
                base = hf[: -len("gate_up_proj")]
                for sub, sl in (("gate_proj", slice(0, F)), ("up_proj", slice(F, 2 * F))):
                    name = gguf_name(base + sub + ".weight")
                    for e_ in range(E):
                        check_shape(name, hf, arr[e_, sl].shape)
                    plans[name] = TensorPlan(name, (E, F, st.shape[2]), [_part(st, arr[e_, sl]) for e_ in range(E)])
            continue
        name = gguf_name(hf)
        check_shape(name, hf, st.shape)
        if st.dtype not in ("F32", "F16", "BF16"):
            raise ConvertError(f"{st.file.path}: tensor {hf} has dtype {st.dtype}; only F32, F16 and BF16 "
                               "checkpoints can be converted")
        part: Part = _part(st)
        shape = tuple(st.shape) if st.shape else (1,)
        if fam.permute_qk and hf.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            heads = n_head if ".q_proj." in hf else n_head_kv
            perm = qk_permutation(st.shape[0], heads)
            part = RowPermuted(part, perm) if len(st.shape) == 2 else ColPermuted(part, perm)
        plans[name] = TensorPlan(name, shape, [part])

    for name, by_id in experts.items():
        ids = sorted(by_id)
        n = n_expert or len(ids)
        missing = [i for i in range(n) if i not in by_id]
        if missing or len(ids) != n:
            raise ConvertError(f"{index.folder}: {where[name]}: experts {missing or ids[n:]} are missing or extra "
                               f"(config.json says {n} experts)")
        first = by_id[0]
        for i in ids:
            st = by_id[i]
            if st.shape != first.shape or len(st.shape) != 2:
                raise ConvertError(f"{index.folder}: {where[name].replace('*', str(i))} has shape {list(st.shape)}, "
                                   f"expert 0 has {list(first.shape)}")
            check_shape(name, where[name].replace("*", str(i)), st.shape)
        plans[name] = TensorPlan(name, (n, *first.shape), [_part(by_id[i]) for i in range(n)])

    for t in plans.values():
        t.check()
        natives = {p.native for p in t.parts}
        t.source_qtype = natives.pop() if len(natives) == 1 else None  # "--rest keep": the checkpoint's dtype
    return sorted(plans.values(), key=_order)


_FIRST = ("token_embd", "rope_freqs")


def _order(t: TensorPlan) -> tuple:
    m = _BLOCK_RE.match(t.name)
    if m:
        return (1, int(m.group(1)), t.name)
    return (0 if t.name.startswith(_FIRST) else 2, 0, t.name)


def _llama3_rope_freqs(rope: dict, head_dim: int) -> TensorPlan:
    """llama 3.1's frequency factors as the rope_freqs tensor llama.cpp reads (one per pair)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    lo, hi = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = np.empty(len(freqs), dtype=np.float32)
    for i, f in enumerate(freqs):
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / hi:
            out[i] = 1.0
        elif wavelen > old_ctx / lo:
            out[i] = factor
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out[i] = 1.0 / ((1 - smooth) / factor + smooth)
    return TensorPlan("rope_freqs.weight", (len(out),), [ArrayPart(out, Q.F32)])
