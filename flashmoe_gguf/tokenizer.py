"""Tokenizer built from GGUF metadata, tokenizing as llama.cpp does.

Two vocabulary kinds (``tokenizer.ggml.model``):

* ``gpt2`` -- byte-level BPE, run by the ``tokenizers`` library: a BPE model over the GGUF
  tokens and merges, behind the pre-tokenizer regexes that ``tokenizer.ggml.pre`` names
  (llama.cpp's table, see ``_PRE``). An unknown or unsupported ``pre`` falls back to the GPT-2
  regex with a warning (llama.cpp refuses to load such a file; we prefer a model that runs with
  a tokenization that may differ on rare inputs -- digits, contractions -- to one that does not).
* ``llama`` -- SentencePiece BPE ("SPM"), run by ``sentencepiece`` on a model proto built from
  the tokens, scores and token types. llama.cpp merges the adjacent pair whose union has the
  highest score, exactly what sentencepiece's BPE model does, so the proto says BPE whatever
  the original model was. Spaces become U+2581 and a space is prepended to every text fragment
  that starts the input or follows a special token (``add_space_prefix``), as llama.cpp does.

Around both: special tokens (control, user-defined, unknown types) are cut out of the text
first, longest token first, as llama.cpp's ``tokenizer_st_partition`` does (control and unknown
tokens only when ``parse_special``; user-defined ones always); BOS/EOS are added as the
metadata says, with llama.cpp's defaults when a key is absent.

Decoding concatenates token pieces as llama.cpp's ``token_to_piece`` renders them (what
llama-cli and llama-simple print): no leading-space removal, no "clean up tokenization spaces".
One deliberate difference: a byte-level BPE token holding a character outside the GPT-2 byte
alphabet decodes to that character's UTF-8, where llama.cpp prints ``[UNK_BYTE_0x..]``.

Not reproduced: per-model token attributes that llama.cpp hard-codes by model name (lstrip on
jina/modern-bert ``<mask>``, rstrip of phi-3 special tokens); the ``t5``, ``bert``, ``rwkv``,
``plamo2`` and ``gemma4`` vocabularies.
"""
from __future__ import annotations

import codecs
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gguf import Keys

K = Keys.Tokenizer


class TokenizerError(ValueError):
    """Missing or invalid tokenizer metadata; the message names the key and the source file."""


# ---------------------------------------------------------------------------------------------
# token types and attributes
# ---------------------------------------------------------------------------------------------

class Attr:
    """Token attribute bits, as llama.cpp derives them from ``tokenizer.ggml.token_type``
    (plain ints: an enum.IntFlag costs a second per 100k tokens)."""
    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# tokenizer.ggml.token_type values (gguf.TokenType) -> attributes
_TYPE_ATTR = {0: Attr.UNDEFINED, 1: Attr.NORMAL, 2: Attr.UNKNOWN, 3: Attr.CONTROL,
              4: Attr.USER_DEFINED, 5: Attr.UNUSED, 6: Attr.BYTE}
_SPECIAL = Attr.CONTROL | Attr.UNKNOWN            # rendered only when asked, parsed only when asked

# Token texts that llama.cpp treats as end of generation (and forces to control type).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
# Special ids that llama.cpp finds by text when the metadata does not give them.
_AUTO_TEXTS = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
            "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>",
            "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_SPECIAL_ID_KEYS = {
    "bos": (K.BOS_ID,), "eos": (K.EOS_ID,), "eot": (K.EOT_ID,), "eom": (K.EOM_ID,),
    "unk": (K.UNK_ID,), "sep": (K.SEP_ID,), "pad": (K.PAD_ID,), "mask": (K.MASK_ID,),
    "fim_pre": (K.FIM_PRE_ID, K.PREFIX_ID), "fim_suf": (K.FIM_SUF_ID, K.SUFFIX_ID),
    "fim_mid": (K.FIM_MID_ID, K.MIDDLE_ID), "fim_pad": (K.FIM_PAD_ID,), "fim_rep": (K.FIM_REP_ID,),
    "fim_sep": (K.FIM_SEP_ID,),
}

# ---------------------------------------------------------------------------------------------
# pre-tokenizer regexes of byte-level BPE vocabularies (tokenizer.ggml.pre), from llama.cpp.
# Each list is applied in turn: every regex splits each piece of the previous split into its
# matches and the text between them (the "isolated" split of the tokenizers library).
# ---------------------------------------------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = [
    r"\p{N}{1,3}",
    r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]
# llama.cpp's rewriting of the GPT-4o regex (upper/lower-case classes as look-aheads).
_UPPER = r"((?=[\p{L}])([^a-z]))"
_LOWER = r"((?=[\p{L}])([^A-Z]))"
_GPT4O = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTIONS + "?"
          r"|[^\r\n\p{L}\p{N}]?" + _UPPER + "+" + _LOWER + "*" + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+"
           r"|[^\r\n\p{L}\p{N}]?" + _UPPER + "+" + _LOWER + "*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"


class _Pre:
    """One pre-tokenizer family: its regexes and the flags llama.cpp sets with it."""

    def __init__(self, regexes: list[str], ignore_merges: bool = False, add_bos: bool = False,
                 no_bos: bool = False):
        self.regexes = regexes
        self.ignore_merges = ignore_merges  # a word that is a token is taken whole
        self.add_bos = add_bos              # default of tokenizer.ggml.add_bos_token
        self.no_bos = no_bos                # no default BOS id


def _pre_table() -> dict[str, _Pre]:
    t: dict[str, _Pre] = {}

    def add(names: str, pre: _Pre) -> None:
        for n in names.split():
            t[n] = pre

    add("default", _Pre([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]))
    add("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        _Pre([_LLAMA3], ignore_merges=True, add_bos=True))
    add("dbrx smaug-bpe", _Pre([_LLAMA3]))
    add("glm4 chatglm-bpe", _Pre([_LLAMA3], no_bos=True))
    add("deepseek-coder", _Pre([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+",
                                r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"]))
    add("deepseek-v3 hunyuan-dense joyai-llm hy_v4", _Pre(_DEEPSEEK3))
    add("falcon", _Pre([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"]))
    add("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
        _Pre([r"\p{N}", _GPT2]))
    add("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
        "jina-v1-en jina-v2-code roberta-bpe mpt olmo jais trillion granite-docling exaone4",
        _Pre([_GPT2]))
    add("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open", _Pre([_QWEN2]))
    add("qwen35", _Pre([_QWEN35]))
    add("poro-chat bloom gpt3-finnish", _Pre([_BLOOM]))
    add("viking", _Pre([_BLOOM, r"\p{N}"]))
    add("tekken", _Pre([_TEKKEN], ignore_merges=True, add_bos=True))
    add("gpt-4o llama4 kanana2 talkie minimax-m2", _Pre([_GPT4O]))
    add("seed-coder", _Pre([_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                            r"|\s*[\r\n]+|\s+(?!\S)|\s+"]))
    add("grok-2", _Pre([_QWEN2]))
    add("bailingmoe bailingmoe2 llada-moe",
        _Pre([r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"]))
    add("minicpm5", _Pre([r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"], ignore_merges=True))
    return t


_PRE = _pre_table()

# ---------------------------------------------------------------------------------------------
# metadata access
# ---------------------------------------------------------------------------------------------


class _Meta:
    def __init__(self, md: Mapping[str, Any], source: str):
        self.md = md
        self.where = f" in {source}" if source else ""

    def error(self, key: str, what: str) -> TokenizerError:
        return TokenizerError(f"tokenizer metadata key '{key}' {what}{self.where}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.md.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.md:
            raise self.error(key, "is missing")
        return self.md[key]

    def str_list(self, key: str, required: bool = True) -> list[str] | None:
        v = self.require(key) if required else self.md.get(key)
        if v is None:
            return None
        if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, np.ndarray)):
            raise self.error(key, f"must be an array of strings, got {type(v).__name__}")
        out = []
        for s in v:
            if isinstance(s, bytes):
                s = s.decode("utf-8", errors="replace")
            if not isinstance(s, str):
                raise self.error(key, f"must be an array of strings, holds {type(s).__name__}")
            out.append(s)
        return out

    def num_array(self, key: str, n: int, dtype) -> np.ndarray | None:
        v = self.md.get(key)
        if v is None:
            return None
        try:
            a = np.asarray(v, dtype=dtype)
        except (TypeError, ValueError):
            raise self.error(key, "must be a numeric array") from None
        if a.ndim != 1 or a.shape[0] < n:
            raise self.error(key, f"must hold at least {n} values (one per token), has {a.size}")
        return a[:n]

    def flag(self, key: str, default: bool) -> bool:
        v = self.md.get(key)
        if v is None:
            return default
        if isinstance(v, (bool, np.bool_, int, np.integer)):
            return bool(v)
        raise self.error(key, f"must be a boolean, got {v!r}")

    def token_id(self, key: str) -> int | None:
        v = self.md.get(key)
        if v is None:
            return None
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise self.error(key, f"must be an integer, got {v!r}")
        return int(v)


# ---------------------------------------------------------------------------------------------
# backends: byte-level BPE (tokenizers) and SPM (sentencepiece)
# ---------------------------------------------------------------------------------------------


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the
    others to U+0100 upwards, in byte order."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


class _BpeBackend:
    def __init__(self, tokens: list[str], merges: list[str], pre: _Pre):
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(tokens)}
        pairs: list[tuple[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for m in merges:
            # llama.cpp splits at the first space after the first character
            pos = m.find(" ", 1)
            if pos < 0:
                continue
            a, b = m[:pos], m[pos + 1:]
            # the tokenizers library rejects merges whose parts or result are not tokens;
            # llama.cpp would merge and then spell the result out in bytes: keep the rest
            if (a, b) in seen or a not in vocab or b not in vocab or a + b not in vocab:
                continue
            seen.add((a, b))
            pairs.append((a, b))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._tok = tok

    def encode(self, fragments: list[str]) -> list[list[int]]:
        if len(fragments) == 1:
            return [self._tok.encode(fragments[0], add_special_tokens=False).ids]
        return [e.ids for e in self._tok.encode_batch(fragments, add_special_tokens=False)]


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1                     # negative int32 fields take ten bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb_int(field: int, v: int) -> bytes:
    return _varint(field << 3) + _varint(v)


def _pb_bytes(field: int, b: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(b)) + b


def _pb_float(field: int, f: float) -> bytes:
    return _varint((field << 3) | 5) + struct.pack("<f", f)


def _spm_model_proto(pieces: list[str], scores: np.ndarray, types: list[int], unk: int,
                     byte_fallback: bool) -> bytes:
    """Serialized sentencepiece ModelProto (protobuf wire format, written directly so that no
    protobuf package is needed): BPE model, identity normalizer without dummy prefix, extra
    whitespace removal or whitespace escaping -- the caller escapes spaces as llama.cpp does."""
    out = bytearray()
    for p, s, t in zip(pieces, scores, types):
        msg = _pb_bytes(1, p.encode("utf-8")) + _pb_float(2, float(s)) + _pb_int(3, t)
        out += _pb_bytes(1, msg)
    trainer = (_pb_int(3, 2) + _pb_int(4, len(pieces)) + _pb_int(35, int(byte_fallback))
               + _pb_int(40, unk) + _pb_int(41, -1) + _pb_int(42, -1) + _pb_int(43, -1))
    out += _pb_bytes(2, trainer)
    normalizer = _pb_bytes(1, b"identity") + _pb_int(3, 0) + _pb_int(4, 0) + _pb_int(5, 0)
    out += _pb_bytes(3, normalizer)
    return bytes(out)


# sentencepiece piece types
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_BYTE = 1, 2, 3, 6


class _SpmBackend:
    def __init__(self, tokens: list[str], scores: np.ndarray, attrs: list[int], meta: _Meta):
        import sentencepiece

        # llama.cpp lets any token take part in merges (it looks texts up in the whole vocab):
        # user-defined, unused and untyped tokens become normal pieces; control tokens cannot
        # be formed from text in practice ("<s>" would need "<s" in the vocabulary).
        types: list[int] = []
        unk = -1
        n_bytes = 0
        for t, a in zip(tokens, attrs):
            if a & Attr.UNKNOWN and unk < 0:
                unk = len(types)
                types.append(_SP_UNKNOWN)
            elif a & (Attr.CONTROL | Attr.UNKNOWN):
                types.append(_SP_CONTROL)
            elif a & Attr.BYTE and _BYTE_PIECE.match(t):
                types.append(_SP_BYTE)
                n_bytes += 1
            else:
                types.append(_SP_NORMAL)
        byte_fallback = n_bytes == 256     # sentencepiece wants all of them or none
        if not byte_fallback and n_bytes:
            # rare: some byte tokens only. Unknown characters then become the unknown token
            types = [_SP_NORMAL if t == _SP_BYTE else t for t in types]
        pieces = list(tokens)
        scores = np.asarray(scores, dtype=np.float32)
        if unk < 0:                         # sentencepiece requires one unknown piece
            unk = len(pieces)
            pieces.append("\u2047unk\u2047")
            types.append(_SP_UNKNOWN)
            scores = np.append(scores, np.float32(0))
        self.synthetic_unk = unk if unk >= len(tokens) else -1
        proto = _spm_model_proto(pieces, scores, types, unk, byte_fallback)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise meta.error(K.LIST, f"cannot be loaded as a sentencepiece vocabulary ({e})") from None

    def encode(self, fragments: list[str]) -> list[list[int]]:
        res = self._sp.encode(fragments, out_type=int)
        if self.synthetic_unk >= 0:
            # a vocabulary without an unknown token: characters that no token spells are left
            # out (llama.cpp would fail on them unless the vocabulary has byte tokens)
            res = [[i for i in ids if i != self.synthetic_unk] for ids in res]
        return res


# ---------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """A GGUF vocabulary: ``encode`` text to ids and ``decode`` ids to text as llama.cpp does."""

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    eog_ids: frozenset[int]

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], source: str = "") -> "Tokenizer":
        """Build from GGUF metadata as python values (``gguf.ReaderField.contents()``; numeric
        arrays may also be numpy arrays). ``source`` names the file in error messages."""
        return cls(_Meta(md, str(source)))

    def __init__(self, meta: _Meta):
        model = meta.require(K.MODEL)
        if not isinstance(model, str):
            raise meta.error(K.MODEL, f"must be a string, got {model!r}")
        if model not in ("gpt2", "llama"):
            raise meta.error(K.MODEL, f"names a vocabulary this runtime does not support: {model!r} "
                                      "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
        self.kind = "bpe" if model == "gpt2" else "spm"
        tokens = meta.str_list(K.LIST)
        n = len(tokens)
        if n == 0:
            raise meta.error(K.LIST, "is empty")
        self.n_vocab = n
        # llama.cpp renames empty tokens so that every text is unique and non-empty
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        text_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if text_to_id.setdefault(t, i) != i:
                raise meta.error(K.LIST, f"holds the token {t!r} twice (ids {text_to_id[t]} and {i})")
        self._tokens = tokens
        self._text_to_id = text_to_id

        types = meta.num_array(K.TOKEN_TYPE, n, np.int64)
        if types is None:
            attrs = [Attr.NORMAL] * n
        else:
            attrs = [_TYPE_ATTR.get(int(t), Attr.UNDEFINED) for t in types]
        scores = meta.num_array(K.SCORES, n, np.float32)
        if scores is None:
            scores = np.zeros(n, dtype=np.float32)

        # --- flags and default special ids, per vocabulary kind ---
        pre: _Pre | None = None
        self.pre = None
        if self.kind == "bpe":
            merges = meta.str_list(K.MERGES)
            pre_name = meta.get(K.PRE)
            if pre_name is None:
                warnings.warn(f"{K.PRE} is missing{meta.where}: using llama.cpp's 'default' "
                              "pre-tokenizer; tokenization may differ from the model's", stacklevel=3)
                pre_name = "default"
            if not isinstance(pre_name, str):
                raise meta.error(K.PRE, f"must be a string, got {pre_name!r}")
            pre = _PRE.get(pre_name)
            if pre is None:
                warnings.warn(f"{K.PRE} = {pre_name!r}{meta.where} is not supported: falling back "
                              "to the GPT-2 pre-tokenizer regex; tokenization may differ from "
                              "llama.cpp's on some inputs", stacklevel=3)
                pre = _PRE["gpt-2"]
            self.pre = pre_name
            default_add_bos, default_add_eos, self.add_space_prefix = pre.add_bos, False, False
            ids: dict[str, int | None] = {k: None for k in _SPECIAL_ID_KEYS}
            ids["bos"] = None if pre.no_bos else 11
            ids["eos"] = 11
        else:
            default_add_bos, default_add_eos = True, False
            self.add_space_prefix = meta.flag(K.ADD_PREFIX, True)
            ids = {k: None for k in _SPECIAL_ID_KEYS}
            ids.update(bos=1, eos=2, unk=0)
        for name, keys in _SPECIAL_ID_KEYS.items():
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None            # default out of the vocabulary: disabled
            for key in keys:
                v = meta.token_id(key)
                if v is not None and 0 <= v < n:
                    ids[name] = v
                    break
                if v is not None:
                    warnings.warn(f"{key} = {v}{meta.where} is outside the vocabulary of {n} tokens; "
                                  "ignored", stacklevel=3)

        self.add_bos = meta.flag(K.ADD_BOS, default_add_bos)
        self.add_eos = meta.flag(K.ADD_EOS, default_add_eos)
        if self.add_bos and ids["bos"] is None:
            raise meta.error(K.ADD_BOS, f"is true but {K.BOS_ID} is not set")
        if self.add_eos and ids["eos"] is None:
            raise meta.error(K.ADD_EOS, f"is true but {K.EOS_ID} is not set")

        # --- special ids found by text, end-of-generation set (llama.cpp's rules) ---
        for name, texts in _AUTO_TEXTS.items():
            found = [text_to_id[t] for t in texts if t in text_to_id]
            if ids[name] is None and found:
                ids[name] = min(found)
                attrs[ids[name]] |= Attr.CONTROL
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for t in _EOG_TEXTS:
            i = text_to_id.get(t)
            if i is not None:
                eog.add(i)
                attrs[i] |= Attr.CONTROL
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):   # gpt-oss
            if t in text_to_id:
                attrs[text_to_id[t]] = Attr.USER_DEFINED
        eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
        eog_texts = {tokens[i] for i in eog}
        if "<|end|>" in eog_texts and (
                {"<|return|>", "<|call|>"} <= eog_texts or {"<|calls|>", "<|flush|>"} <= eog_texts):
            # harmony-style vocabularies: <|end|> closes a message, not the generation
            eog.discard(text_to_id["<|end|>"])
            attrs[text_to_id["<|end|>"]] = Attr.USER_DEFINED
        if {"<|tool_response>", "</s>"} <= eog_texts:
            eog.discard(text_to_id["</s>"])
            attrs[text_to_id["</s>"]] = Attr.NORMAL
        self.eog_ids = frozenset(eog)
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.special_ids = dict(ids)
        self._attrs = attrs

        # special tokens cut out of the text before tokenizing, longest first
        mask = Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN
        special = [i for i, a in enumerate(attrs) if a & mask]
        special.sort(key=lambda i: (-len(tokens[i].encode("utf-8")), i))
        self._special = [(tokens[i], i, bool(attrs[i] & _SPECIAL)) for i in special]

        if self.kind == "bpe":
            assert pre is not None
            try:
                self._backend = _BpeBackend(tokens, merges, pre)
            except Exception as e:          # tokenizers raises plain Exceptions
                raise meta.error(K.MERGES, f"cannot build a BPE model ({e})") from None
        else:
            self._backend = _SpmBackend(tokens, scores, attrs, meta)
        self._pieces: list[bytes | None] = [None] * n

    # ----- encoding -----

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split ``text`` into raw-text fragments and special token ids, as llama.cpp's
        ``tokenizer_st_partition``: for each special token, longest first, every remaining text
        fragment is split at each occurrence of it, left to right."""
        frags: list[str | int] = [text] if text else []
        for t, i, is_special in self._special:
            if is_special and not parse_special:
                continue
            if t not in text:
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or t not in f:
                    out.append(f)
                    continue
                parts = f.split(t)
                for k, p in enumerate(parts):
                    if k:
                        out.append(i)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_special``: add BOS/EOS as the metadata says;
        ``parse_special``: text such as ``<|im_start|>`` becomes its control token."""
        frags = self._partition(text, parse_special)
        raw = []
        prev_special = True                 # SPM: a space before text that starts a fragment run
        for f in frags:
            if isinstance(f, str):
                if self.kind == "spm":
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    f = f.replace(" ", "\u2581")
                raw.append(f)
                prev_special = False
            else:
                prev_special = True
        encoded = iter(self._backend.encode(raw)) if raw else iter(())
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        for f in frags:
            if isinstance(f, str):
                out.extend(next(encoded))
            else:
                out.append(f)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    # ----- decoding -----

    def _piece(self, i: int) -> bytes:
        p = self._pieces[i]
        if p is None:
            t, a = self._tokens[i], self._attrs[i]
            if a & (_SPECIAL | Attr.USER_DEFINED):
                p = t.encode("utf-8")
            elif a & Attr.NORMAL:
                if self.kind == "spm":
                    p = t.replace("\u2581", " ").encode("utf-8")
                else:
                    p = b"".join(bytes([_CHAR_TO_BYTE[c]]) if c in _CHAR_TO_BYTE else c.encode("utf-8")
                                 for c in t)
            elif a & Attr.BYTE:
                m = _BYTE_PIECE.match(t)
                p = bytes([int(m.group(1), 16)]) if m else t.encode("utf-8")
            else:                           # unused / undefined types render as nothing
                p = b""
            self._pieces[i] = p
        return p

    def _check(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.n_vocab:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{self.n_vocab - 1})")
        return i

    def token_bytes(self, id: int) -> bytes:
        """The bytes token ``id`` stands for (control tokens: their text), as llama.cpp's
        ``token_to_piece`` with ``special=true``. A piece may be part of a UTF-8 sequence."""
        return self._piece(self._check(id))

    def is_special(self, id: int) -> bool:
        """Control or unknown token (hidden by ``decode(..., skip_special=True)``)."""
        return bool(self._attrs[self._check(id)] & _SPECIAL)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``: their pieces concatenated, invalid UTF-8 replaced by U+FFFD.
        ``skip_special`` leaves out control and unknown tokens."""
        parts = []
        for i in ids:
            i = self._check(i)
            if skip_special and self._attrs[i] & _SPECIAL:
                continue
            parts.append(self._piece(i))
        return b"".join(parts).decode("utf-8", errors="replace")

    def stream(self, skip_special: bool = False) -> "StreamDecoder":
        """An incremental decoder for generated tokens."""
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        kind = f"bpe, pre={self.pre!r}" if self.kind == "bpe" else "spm"
        return (f"Tokenizer({kind}, n_vocab={self.n_vocab}, bos={self.bos_id}, eos={self.eos_id}, "
                f"add_bos={self.add_bos}, eog={sorted(self.eog_ids)})")


class StreamDecoder:
    """Decodes tokens one at a time: ``feed(id)`` returns the text that is complete so far and
    holds back the bytes of a UTF-8 sequence that the next tokens will finish (an emoji or CJK
    character is often split over two or three byte tokens). ``flush()`` returns what is left
    (an unfinished sequence as U+FFFD). The concatenation of everything returned equals
    ``decode(ids)``."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, id: int) -> str:
        i = self._tok._check(id)
        if self._skip and self._tok._attrs[i] & _SPECIAL:
            return ""
        return self._dec.decode(self._tok._piece(i))

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
