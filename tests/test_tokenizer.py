"""Tokenizer from GGUF metadata.

Oracles: llama.cpp's recorded token ids on SmolLM2 (tests/data/smollm2/tokenize.jsonl, byte-level
BPE), sentencepiece itself on a SentencePiece BPE model trained here, and a direct transcription
of llama.cpp's SPM merge loop (highest-scoring adjacent pair first, leftmost on ties, unknown
characters spelled with <0xXX> byte tokens).
"""
from __future__ import annotations

import heapq
import io
import json
import random
from pathlib import Path

import pytest

from flashmoe_gguf.tokenizer import Tokenizer, TokenizerError, _BYTE_TO_CHAR, _PRE

DATA = Path(__file__).parent / "data" / "smollm2"
MODEL = Path(__file__).parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CASES = [json.loads(line) for line in (DATA / "tokenize.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# SmolLM2 (gpt2 byte-level BPE, pre-tokenizer "smollm") against llama.cpp
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_md() -> dict:
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is absent: `make models` downloads it")
    from gguf import GGUFReader

    reader = GGUFReader(MODEL)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smol(smol_md) -> Tokenizer:
    return Tokenizer.from_metadata(smol_md, str(MODEL))


def test_smollm2_ids_equal_llama_cpp(smol):
    assert len(CASES) >= 10
    bad = [(c["text"], smol.encode(c["text"]), c["ids"]) for c in CASES if smol.encode(c["text"]) != c["ids"]]
    assert not bad, "\n".join(f"{t!r}: ours {a} llama.cpp {b}" for t, a, b in bad)


def test_smollm2_special_tokens(smol):
    assert smol.n_vocab == 49152
    assert (smol.bos_id, smol.eos_id, smol.add_bos, smol.add_eos) == (1, 2, False, False)
    # <|endoftext|> and <|im_end|> end a generation; <|im_start|> does not
    assert {0, 2} <= smol.eog_ids and 1 not in smol.eog_ids
    assert smol.token_bytes(1) == b"<|im_start|>"
    assert smol.encode("<|im_start|>user") == [1, 4093]
    # unparsed, the same text is ordinary characters
    plain = smol.encode("<|im_start|>user", parse_special=False)
    assert 1 not in plain and smol.decode(plain) == "<|im_start|>user"


def test_smollm2_decode_round_trip(smol):
    for c in CASES:
        assert smol.decode(c["ids"]) == c["text"]
    assert smol.decode(smol.encode("<|im_start|>user\nhi<|im_end|>"), skip_special=True) == "user\nhi"
    assert smol.token_bytes(smol.encode(" ")[0]) == b" "


def test_smollm2_stream_never_breaks_utf8(smol):
    texts = ["emoji 👨‍👩‍👧‍👦 flags 🇫🇷 😀🚀", "日本語のテキストと中文", "한국어 텍스트 ✓ ∑ ≠"]
    for text in texts:
        ids = smol.encode(text)
        # the test only means something if some token holds part of a character
        partial = [i for i in ids if _invalid_utf8(smol.token_bytes(i))]
        assert partial, text
        dec = smol.stream()
        chunks = [dec.feed(i) for i in ids]
        chunks.append(dec.flush())
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) == smol.decode(ids) == text
        assert "" in chunks[:-1]            # something was held back until completed


def test_stream_flushes_an_unfinished_character(smol):
    ids = smol.encode("😀")
    dec = smol.stream()
    assert [dec.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.flush() == "\ufffd"          # the incomplete sequence, as decode() would show it
    assert smol.decode(ids[:-1]) == "\ufffd"


def test_missing_or_bad_keys_name_key_and_file(smol_md):
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        md = {k: v for k, v in smol_md.items() if k != key}
        with pytest.raises(TokenizerError, match=key) as e:
            Tokenizer.from_metadata(md, "some/model.gguf")
        assert "some/model.gguf" in str(e.value)
    md = dict(smol_md, **{"tokenizer.ggml.token_type": [1, 1, 1]})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.token_type"):
        Tokenizer.from_metadata(md, "x.gguf")
    md = dict(smol_md, **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata(md, "x.gguf")


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# --------------------------------------------------------------------------------------------
# byte-level BPE pre-tokenizers and defaults, on a vocabulary of bytes only
# --------------------------------------------------------------------------------------------

def _byte_md(pre: str | None, **extra) -> dict:
    tokens = [_BYTE_TO_CHAR[b] for b in range(256)] + ["<|begin_of_text|>", "<|eot_id|>", "<|im_end|>"]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [1] * 256 + [3, 3, 3], "tokenizer.ggml.merges": [],
          "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 257}
    if pre is not None:
        md["tokenizer.ggml.pre"] = pre
    md.update(extra)
    return md


def _words(tok: Tokenizer, text: str) -> list[str]:
    """The pre-tokenizer's pieces, back in plain text."""
    pieces = tok._backend._tok.pre_tokenizer.pre_tokenize_str(text)
    inv = {c: b for b, c in _BYTE_TO_CHAR.items()}
    return [bytes(inv[c] for c in p).decode("utf-8") for p, _ in pieces]


SAMPLE = "I'm 12345 HelloWorld  don'T 日本語\n\n  x"


@pytest.mark.parametrize("pre, expected", [
    # gpt2: letters, digit runs, other runs, trailing-space-aware whitespace
    ("gpt-2", ["I", "'m", " 12345", " HelloWorld", " ", " don", "'", "T", " 日本語", "\n\n ", " x"]),
    # smollm: every digit alone first, then gpt2
    ("smollm", ["I", "'m", " ", "1", "2", "3", "4", "5", " HelloWorld", " ", " don", "'", "T", " 日本語", "\n\n ", " x"]),
    # llama3: digits in threes, case-insensitive contractions, newlines kept apart
    ("llama-bpe", ["I", "'m", " ", "123", "45", " HelloWorld", " ", " don", "'T", " 日本語", "\n\n", " ", " x"]),
    # qwen2: single digits
    ("qwen2", ["I", "'m", " ", "1", "2", "3", "4", "5", " HelloWorld", " ", " don", "'T", " 日本語", "\n\n", " ", " x"]),
    # deepseek-v3: digits in threes, CJK runs alone
    ("deepseek-v3", ["I", "'m", " ", "123", "45", " HelloWorld", " ", " don", "'T", " ", "日本語", "\n\n", " ", " x"]),
    # gpt-4o: camel case split, contractions kept on the word
    ("gpt-4o", ["I'm", " ", "123", "45", " Hello", "World", " ", " don'T", " 日本語", "\n\n", " ", " x"]),
    # llama.cpp's "default": punctuation runs, gpt2, digit runs, digits in threes
    ("default", ["I", "'", "m", " ", "123", "45", " HelloWorld", " ", " don", "'", "T", " 日本語", "\n\n ", " x"]),
])
def test_pre_tokenizer_splits(pre, expected):
    tok = Tokenizer.from_metadata(_byte_md(pre))
    assert _words(tok, SAMPLE) == expected


@pytest.mark.parametrize("pre", sorted(_PRE))
def test_every_pre_tokenizer_keeps_all_text(pre):
    tok = Tokenizer.from_metadata(_byte_md(pre))
    text = SAMPLE + " <x>=1.5e-3;\tÀÉÎ ∑ 😀 ٣٤ ｱｲ\r\n"
    ids = tok.encode(text, add_special=False)
    assert len(ids) == len(text.encode("utf-8"))      # a byte vocabulary: one token per byte
    assert tok.decode(ids) == text


def test_bpe_defaults_follow_llama_cpp():
    # llama3 family: BOS added unless the metadata says otherwise; eot/im_end end generation
    t = Tokenizer.from_metadata(_byte_md("llama-bpe"))
    assert t.add_bos and t.encode("a") == [256] + t.encode("a", add_special=False)
    assert t.encode("<|begin_of_text|>a")[:2] == [256, 256]
    assert {257, 258} <= t.eog_ids
    assert not Tokenizer.from_metadata(_byte_md("llama-bpe", **{"tokenizer.ggml.add_bos_token": False})).add_bos
    # other BPE families: no BOS by default
    assert not Tokenizer.from_metadata(_byte_md("qwen2")).add_bos
    eos = Tokenizer.from_metadata(_byte_md("qwen2", **{"tokenizer.ggml.add_eos_token": True}))
    assert eos.encode("a", add_special=True)[-1] == 257
    assert eos.encode("a", add_special=False)[-1] != 257


def test_unknown_or_missing_pre_warns_and_falls_back():
    with pytest.warns(UserWarning, match="not supported"):
        t = Tokenizer.from_metadata(_byte_md("no-such-pre"))
    assert _words(t, SAMPLE) == _words(Tokenizer.from_metadata(_byte_md("gpt-2")), SAMPLE)
    with pytest.warns(UserWarning, match="missing"):
        t = Tokenizer.from_metadata(_byte_md(None))
    assert t.pre == "default"


def test_add_bos_without_bos_id_is_an_error():
    md = _byte_md("glm4", **{"tokenizer.ggml.add_bos_token": True})
    del md["tokenizer.ggml.bos_token_id"]
    with pytest.raises(TokenizerError, match="tokenizer.ggml.add_bos_token"):
        Tokenizer.from_metadata(md, "glm.gguf")


# --------------------------------------------------------------------------------------------
# SentencePiece vocabularies ("llama"), against sentencepiece itself
# --------------------------------------------------------------------------------------------

WORDS = ("the quick brown fox jumps over lazy dog tokenizer merges bytes fallback sentence piece "
         "model llama runtime expert mixture memory mapped weights").split()


@pytest.fixture(scope="module")
def spm_pair():
    """A tiny SentencePiece BPE model with byte fallback, and its GGUF-style metadata."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    lines += ["café naïve déjà vu", "über straße", "x = 1 + 2 * 3", "Hello, World! How are you?"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, user_defined_symbols=["<tool>"],
        minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]

    def token_type(i: int) -> int:          # gguf.TokenType values
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if tokens[i] == "<tool>" else 1

    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
          "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
          "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
          "tokenizer.ggml.unknown_token_id": sp.unk_id()}
    return sp, md


def _llama_cpp_spm(md: dict, text: str, space_prefix: bool = True) -> list[int]:
    """llama.cpp's SPM tokenization of one text fragment (space prefix, spaces as U+2581)."""
    tokens, scores = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"]
    ids = {t: i for i, t in enumerate(tokens)}
    sym = list((" " * space_prefix + text).replace(" ", "\u2581"))
    nxt = list(range(1, len(sym))) + [-1]
    prv = list(range(-1, len(sym) - 1))
    heap: list = []

    def push(a: int, b: int) -> None:
        if a >= 0 and b >= 0 and sym[a] + sym[b] in ids:
            heapq.heappush(heap, (-scores[ids[sym[a] + sym[b]]], a, len(sym[a]) + len(sym[b])))

    for k in range(1, len(sym)):
        push(k - 1, k)
    while heap:
        _, a, size = heapq.heappop(heap)
        b = nxt[a]
        if b < 0 or not sym[a] or len(sym[a]) + len(sym[b]) != size:
            continue
        sym[a] += sym[b]
        sym[b] = ""
        nxt[a] = nxt[b]
        if nxt[b] >= 0:
            prv[nxt[b]] = a
        push(prv[a], a)
        push(a, nxt[a])
    out, k = [], 0
    while k >= 0:
        s = sym[k]
        out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
        k = nxt[k]
    return out


SPM_TEXTS = ["hello world", "The quick brown fox", "  two  leading spaces and trailing ",
             "naïve café, déjà vu!", "日本語のテキスト", "emoji 😀🚀 and ∑ symbols", "tabs\tand\nnewlines\n",
             "mixture-of-experts memory-mapped weights", "x = 1 + 2 * 3", "a"]


def test_spm_encodes_like_sentencepiece(spm_pair):
    sp, md = spm_pair
    tok = Tokenizer.from_metadata(md, "tiny-spm")
    assert tok.bos_id == sp.bos_id() and tok.eos_id == sp.eos_id()
    assert tok.add_bos and not tok.add_eos          # llama.cpp's SPM defaults
    for text in SPM_TEXTS:
        ours = tok.encode(text, add_special=False)
        assert ours == sp.encode(text), text
        assert ours == _llama_cpp_spm(md, text), text
        assert tok.encode(text) == [sp.bos_id()] + ours
    byte_ids = {i for i in tok.encode("日本語 😀") if md["tokenizer.ggml.token_type"][i] == 6}
    assert len(byte_ids) >= 4                        # the byte fallback was exercised


def test_spm_random_strings(spm_pair):
    sp, md = spm_pair
    tok = Tokenizer.from_metadata(md)
    rng = random.Random(1)
    chars = "abcdefghijklmnopqrstuvwxyz     éüß日本😀\n\t.,!?"
    for _ in range(300):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 40)))
        ours = tok.encode(text, add_special=False)
        assert ours == sp.encode(text) == _llama_cpp_spm(md, text), repr(text)


def test_spm_special_tokens_and_space_prefix(spm_pair):
    sp, md = spm_pair
    tok = Tokenizer.from_metadata(md)
    bos, eos, tool = sp.bos_id(), sp.eos_id(), md["tokenizer.ggml.tokens"].index("<tool>")
    assert eos in tok.eog_ids
    # control tokens parsed from text; llama.cpp prefixes a space to text after any special token
    assert tok.encode("<s>hi</s>there") == [bos, bos] + sp.encode("hi") + [eos] + sp.encode("there")
    # not parsed: spelled with ordinary pieces
    assert bos not in tok.encode("<s>hi", parse_special=False)[1:]
    # user-defined tokens are cut out even when special tokens are not parsed
    assert tok.encode("a<tool>b", add_special=False, parse_special=False) == sp.encode("a") + [tool] + sp.encode("b")
    # no space prefix when the metadata says so
    nospace = Tokenizer.from_metadata(dict(md, **{"tokenizer.ggml.add_space_prefix": False}))
    for text in SPM_TEXTS:
        assert nospace.encode(text, add_special=False) == _llama_cpp_spm(md, text, space_prefix=False)
    assert nospace.encode("hello", add_special=False) != tok.encode("hello", add_special=False)


def test_spm_decode(spm_pair):
    sp, md = spm_pair
    tok = Tokenizer.from_metadata(md)
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        # pieces as llama.cpp renders them: the prefixed space stays, <s> shows unless skipped
        assert tok.decode(ids) == "<s> " + text
        assert tok.decode(ids, skip_special=True) == " " + text
        dec = tok.stream(skip_special=True)
        assert "".join(dec.feed(i) for i in ids) + dec.flush() == " " + text
    assert tok.token_bytes(md["tokenizer.ggml.tokens"].index("<0xE6>")) == b"\xe6"


def test_spm_missing_unknown_token_still_loads(spm_pair):
    _, md = spm_pair
    types = [1 if t == 2 else t for t in md["tokenizer.ggml.token_type"]]
    tok = Tokenizer.from_metadata(dict(md, **{"tokenizer.ggml.token_type": types}))
    assert tok.decode(tok.encode("hello 日本", add_special=False)) == " hello 日本"
