"""Tokenizer metadata from a Hugging Face folder, as llama.cpp's converter writes it.

* SentencePiece (``tokenizer.model``): ``tokenizer.ggml.model = "llama"``, pieces, scores and
  types; ``added_tokens.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder`` on top.
* Byte-level BPE (``tokenizer.json``): ``"gpt2"``, tokens by id (ids without a token become
  ``[PADi]``, unused), added tokens as control (special, or ``<|...|>``-looking) or user-defined,
  merges, and the pre-tokenizer name: llama.cpp's name for the tokenizer's fingerprint on its
  probe text, else recognised from the pre-tokenizer's regex.
* Special token ids, add-BOS/EOS flags and the chat template: ``gguf.SpecialVocab``.

Which vocabulary is tried first depends on the architecture, as in llama.cpp: llama/mistral and
qwen2/qwen3 try SentencePiece first; the MoE families read tokenizer.json.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, SpecialVocab, TokenType

from .bpe_pre import PRE_BY_FINGERPRINT, PROBE_TEXT
from .errors import ConvertError

# pre-tokenizer regexes of tokenizer.json files -> tokenizer.ggml.pre, when the fingerprint is unknown
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read ({e})") from None


def looks_special(text: str) -> bool:
    """Added tokens that llama.cpp marks as control even when not flagged special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def add_vocab(w: GGUFWriter, folder: Path, family: str, n_vocab: int | None) -> str:
    """Write the tokenizer keys; ``family``: "llama", "qwen" (SentencePiece first) or "bpe".
    Returns the vocabulary kind written ("llama" or "gpt2")."""
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if family == "llama" and isinstance(config.get("add_prefix_space"), bool):
        w.add_add_space_prefix(config["add_prefix_space"])
    if family in ("llama", "qwen") and (folder / "tokenizer.model").is_file():
        _spm(w, folder, config, n_vocab)
        kind = "llama"
    elif (folder / "tokenizer.json").is_file():
        tj = _read_json(folder / "tokenizer.json")
        model = tj.get("model") or {}
        if family == "llama" and model.get("type") == "BPE" and model.get("byte_fallback") and \
                (tj.get("decoder") or {}).get("type") == "Sequence":
            _llama_hf(w, folder)
            kind = "llama"
        else:
            _bpe(w, folder, tj, config, n_vocab)
            kind = "gpt2"
    else:
        raise ConvertError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    special = SpecialVocab(folder, load_merges=(kind == "gpt2"), n_vocab=n_vocab)
    if kind == "gpt2" and _bytelevel_post_processor(folder):
        # a ByteLevel post-processor adds no BOS/EOS (newer gguf-py says so; 0.19 does not)
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(w, quiet=True)
    return kind


def _bytelevel_post_processor(folder: Path) -> bool:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return False
    post = _read_json(path).get("post_processor") or {}
    return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in post.get("processors", [post]))


def _spm(w: GGUFWriter, folder: Path, config: dict, n_vocab: int | None) -> None:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(folder / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{folder / 'tokenizer.model'}: cannot load ({e})") from None
    n = n_vocab or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [TokenType.UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                    else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i) else TokenType.NORMAL)
    added = folder / "added_tokens.json"
    if added.is_file():
        for text, i in _read_json(added).items():
            if isinstance(i, int) and 0 <= i < n:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, TokenType.USER_DEFINED
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        i = int(key)
        if not 0 <= i < n or not isinstance(entry, dict):
            continue
        text = str(entry.get("content", ""))
        if entry.get("special") or looks_special(text):
            types[i] = TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = TokenType.USER_DEFINED
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


def _llama_hf(w: GGUFWriter, folder: Path) -> None:
    """SentencePiece-style BPE given only as tokenizer.json (gguf's LlamaHfVocab, which needs
    transformers)."""
    try:
        from gguf import LlamaHfVocab

        vocab = LlamaHfVocab(folder)
    except ImportError:
        raise ConvertError(f"{folder}: this tokenizer.json (SentencePiece-style BPE) needs the "
                           "transformers package to convert") from None
    tokens, scores, types = [], [], []
    for text, score, typ in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(typ)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)


def pre_tokenizer_name(folder: Path, tj: dict) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROBE_TEXT).ids
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise ConvertError(f"{folder / 'tokenizer.json'}: cannot load ({e})") from None
    name = PRE_BY_FINGERPRINT.get(hashlib.sha256(str(ids).encode()).hexdigest())
    if name is not None:
        return name
    name = _pre_from_structure(tj.get("pre_tokenizer") or {})
    if name is None:
        warnings.warn(f"{folder / 'tokenizer.json'}: pre-tokenizer not recognised; writing 'default' "
                      "(llama.cpp's default regexes), tokenization may differ on some texts", stacklevel=2)
        name = "default"
    return name


def _pre_from_structure(pre: dict) -> str | None:
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = [s for s in steps or [] if isinstance(s, dict)]
    kinds = [s.get("type") for s in steps]
    for s in steps:
        if s.get("type") == "Split":
            rx = (s.get("pattern") or {}).get("Regex")
            if rx in _SPLIT_NAMES:
                return _SPLIT_NAMES[rx]
            return None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    return None


def _bpe(w: GGUFWriter, folder: Path, tj: dict, config: dict, n_vocab: int | None) -> None:
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer "
                           f"(model type {model.get('type')!r}); this converter handles BPE and SentencePiece")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added: dict[int, dict] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict):
            added[int(key)] = entry
    for entry in tj.get("added_tokens") or []:
        added[int(entry["id"])] = entry
    for i, entry in added.items():
        by_id[i] = str(entry.get("content", ""))
    top = max(by_id) + 1 if by_id else 0
    n = n_vocab or top
    if top > n:
        raise ConvertError(f"{folder / 'tokenizer.json'}: token id {top - 1} is outside the model's "
                           f"vocabulary of {n} (config.json vocab_size)")
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            text = by_id[i]
            if added[i].get("special") or looks_special(text):
                types.append(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(folder, tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
