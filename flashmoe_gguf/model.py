"""The Python API: ``Model.load(path)``, tokenize/detokenize, logits, streaming generate."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from . import arch
from .config import ModelConfig
from .errors import ContextOverflowError, FlashMoEError, ModelError
from .gguf_file import GGUFFile
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens actually computed for the prompt (a cached prefix is skipped)
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    ttft_seconds: float = 0.0  # time to first token, from the call

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # decode_seconds runs from the first generated token to the last: decode_tokens - 1 steps
        steps = self.decode_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tok, {self.prompt_tps:.1f} tok/s | "
            f"decode: {self.decode_tokens} tok, {self.decode_tps:.1f} tok/s | "
            f"ttft {self.ttft_seconds * 1000:.0f} ms"
        )


class Chunk(NamedTuple):
    token: int | None  # the generated token id (None on the closing chunk)
    text: str  # its text (complete UTF-8 only; bytes of a split character wait for the next)
    stats: GenerationStats | None = None  # set on the closing chunk
    finish_reason: str | None = None  # "stop" (end-of-generation token or stop string) | "length"


def _set_threads(threads: int | None) -> None:
    import numba

    n = threads or int(os.environ.get("FLASHMOE_THREADS", 0)) or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


class Model:
    """A GGUF model, memory-mapped, with one KV cache (one conversation at a time)."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, tokenizer: Tokenizer, net, n_ctx: int, n_batch: int):
        self.file = gf
        self.config = cfg
        self.tokenizer = tokenizer
        self.net = net
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        self.last_stats: GenerationStats | None = None
        self.store = getattr(net, "store", None)  # ExpertStore of a MoE model, else None

    @classmethod
    def load(cls, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None,
             n_batch: int = 256, experts_per_token: int | None = None, expert_read: str = "populate",
             max_resident_gb: float | None = None, mlock_dense: bool = False,
             device: str = "cpu", gpu_expert_cache_gb: float = 0.0,
             unified_memory: bool = False) -> "Model":
        """Open a GGUF (any split of a multi-file model) and prepare it to run.

        n_ctx: context window (default: the model's training context, at most 4096).
        threads: compute threads (default: all cores). n_batch: prompt tokens per forward pass.
        MoE models: experts_per_token overrides the model's top-k; expert_read is how routed
        experts are brought in (see expert_store.METHODS); max_resident_gb caps the resident
        expert bytes (least recently used experts are evicted from the page cache);
        mlock_dense keeps the non-expert weights resident. device: cpu, cuda, hybrid or auto;
        gpu_expert_cache_gb: hybrid's GPU expert cache; unified_memory: GPU kernels read the
        experts in place from the mapped file (see device.py).
        """
        if n_ctx is not None and n_ctx <= 0:
            raise FlashMoEError(f"n_ctx must be positive, got {n_ctx}")
        if n_batch <= 0:
            raise FlashMoEError(f"n_batch must be positive, got {n_batch}")
        if max_resident_gb is not None and max_resident_gb <= 0:
            raise FlashMoEError(f"max_resident_gb must be positive, got {max_resident_gb}")
        _set_threads(threads)
        gf = GGUFFile(path)
        cfg = ModelConfig.from_metadata(gf.metadata, str(gf.path))
        if experts_per_token is not None:
            if not cfg.is_moe:
                raise FlashMoEError(f"{gf.path}: experts_per_token given, but the model has no experts")
            if not 1 <= experts_per_token <= cfg.n_expert:
                raise FlashMoEError(f"experts_per_token must be in 1..{cfg.n_expert}, got {experts_per_token}")
            cfg = dataclasses.replace(cfg, n_expert_used=experts_per_token)
        tokenizer = Tokenizer.from_metadata(gf.metadata, str(gf.path))
        n_ctx = n_ctx or min(cfg.n_ctx_train, 4096)
        store = None
        if cfg.is_moe:
            from .expert_store import METHODS, ExpertStore

            if expert_read not in METHODS:
                raise FlashMoEError(f"unknown expert read method {expert_read!r} (one of {', '.join(METHODS)})")
            store = ExpertStore(expert_read, max_resident=max_resident_gb * 1e9 if max_resident_gb else None)
            store.prepare(gf)
        net = arch.build(gf, cfg, n_ctx, store=store)
        if device != "cpu" or unified_memory:
            from .device import place

            net = place(net, device, gf=gf, gpu_expert_cache_gb=gpu_expert_cache_gb, unified=unified_memory)
        if mlock_dense:
            from .expert_store import mlock

            for t in gf:
                if "_exps." not in t.name:
                    mlock(gf.raw(t.name))
        if tokenizer.n_vocab != net.n_vocab:
            raise ModelError(f"{gf.path}: tokenizer has {tokenizer.n_vocab} tokens but the output has {net.n_vocab} rows")
        return cls(gf, cfg, tokenizer, net, n_ctx, n_batch)

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- computing ------------------------------------------------------------------------------
    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.ndim != 1:
            raise FlashMoEError("token ids must be a flat sequence")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.net.n_vocab):
            raise FlashMoEError(f"token id out of range [0, {self.net.n_vocab})")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``ids`` in a fresh context: float32 [len(ids), n_vocab]."""
        ids = np.asarray(ids, dtype=np.int64)
        self._check_ids(ids)
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        self._cached = []
        out = np.empty((len(ids), self.net.n_vocab), dtype=np.float32)
        for s in range(0, len(ids), self.n_batch):
            chunk = ids[s : s + self.n_batch]
            out[s : s + len(chunk)] = self.net.forward(chunk, s, all_logits=True)
        self._cached = ids.tolist()
        return out

    def _eval(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """Bring the cache to hold ``ids``, reusing the longest cached prefix; logits of the last."""
        n_common = 0
        for a, b in zip(self._cached, ids):
            if a != b:
                break
            n_common += 1
        n_common = min(n_common, len(ids) - 1)  # always compute the last token for its logits
        if n_common < len(self._cached) and not getattr(self.net, "supports_prefix_reuse", True):
            n_common = 0  # recurrent state: it can only continue from where it stands
        self._cached = self._cached[:n_common]
        arr = np.asarray(ids, dtype=np.int64)
        logits = None
        for s in range(n_common, len(ids), self.n_batch):
            chunk = arr[s : s + self.n_batch]
            logits = self.net.forward(chunk, s)
            self._cached.extend(chunk.tolist())
        return logits[0], n_common

    def reset(self) -> None:
        """Forget the cached context."""
        self._cached = []

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Chunk]:
        """Stream the continuation of ``prompt`` (text, tokenized with special tokens parsed and
        BOS as the metadata says, or token ids): one Chunk per token, then a closing Chunk with
        the stats. ``temperature=0`` is greedy. Stops at an end-of-generation token, a stop
        string, ``max_tokens`` or the end of the context."""
        t_start = time.perf_counter()
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed))
        if max_tokens < 0:
            raise FlashMoEError(f"max_tokens must be >= 0, got {max_tokens}")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise FlashMoEError("the prompt is empty")
        self._check_ids(np.asarray(ids, dtype=np.int64))
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx}")
        return self._generate(ids, max_tokens, sampler, tuple(stop), t_start)

    def _generate(self, ids: list[int], max_tokens: int, sampler: Sampler, stop: tuple[str, ...],
                  t_start: float) -> Iterator[Chunk]:
        stats = GenerationStats()
        self.last_stats = stats
        logits, n_cached = self._eval(ids)
        if self.store is not None:
            self.store.reset_stats()  # per-token expert stats cover the decode steps
            self.store.trim()  # under --max-resident: drop stray (readahead) expert pages
        stats.cached_tokens = n_cached
        stats.prompt_tokens = len(ids) - n_cached
        stats.prompt_seconds = time.perf_counter() - t_start
        history = list(ids)
        stream = self.tokenizer.stream()
        text_so_far = ""
        finish = "length"
        t_dec = time.perf_counter()
        # greedy on a GPU: each step's argmax feeds the next on the device (no logits to the host)
        on_device = sampler.greedy and getattr(self.net, "greedy_on_device", False)
        steps = None
        for i in range(max_tokens):
            if steps is None:
                tok = sampler(logits, history)
            else:
                tok = next(steps)
                self._cached.append(history[-1])  # (its step ran: its K/V are in the cache)
            if i == 0:
                t_dec = time.perf_counter()
                stats.ttft_seconds = t_dec - t_start
            if tok in self.tokenizer.eog_ids:
                finish = "stop"
                break
            history.append(tok)
            piece = stream.feed(tok)
            stats.decode_tokens += 1
            if stop and piece:
                text_so_far += piece
                hit = min((text_so_far.find(s) for s in stop if s and s in text_so_far), default=-1)
                if hit >= 0:
                    cut = len(piece) - (len(text_so_far) - hit)
                    if cut > 0:
                        yield Chunk(tok, piece[:cut])
                    finish = "stop"
                    break
            yield Chunk(tok, piece)
            if len(history) >= self.n_ctx or i == max_tokens - 1:
                break
            if on_device:
                if steps is None:
                    n = min(max_tokens - 1 - i, self.n_ctx - len(history))
                    steps = self.net.decode_greedy(tok, len(history) - 1, n)
                continue
            if self.store is not None:
                self.store.begin_step()
            logits = self.net.forward(np.array([tok], dtype=np.int64), len(history) - 1)[0]
            if self.store is not None:
                self.store.end_step()
            self._cached.append(tok)
        stats.decode_seconds = time.perf_counter() - t_dec
        tail = stream.flush() if finish != "stop" or not stop else ""
        yield Chunk(None, tail, stats, finish)

    # -- chat -----------------------------------------------------------------------------------
    def chat(self, messages: list[dict], stream: bool = True, max_tokens: int = 512, **sampling):
        """The assistant's reply to OpenAI-style ``messages`` through the model's chat template
        (oldest turns left out when the context is full). ``stream=True``: a chat.ChatStream
        yielding ``{"role": "assistant", "content": piece}`` deltas; ``stream=False``: the reply's
        message dict. ``sampling``: the keywords of ``generate``."""
        from .chat import chat

        return chat(self, messages, stream=stream, max_tokens=max_tokens, **sampling)

    def set_experts_per_token(self, k: int) -> None:
        """MoE models: route each token to ``k`` experts from now on (the model's top-k by
        default). The KV cache is cleared: its entries were computed with the old routing."""
        if not self.config.is_moe:
            raise FlashMoEError("this model has no experts")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.config.n_expert:
            raise FlashMoEError(f"experts per token must be an integer in 1..{self.config.n_expert}, got {k!r}")
        for blk in self.net.blocks:
            if hasattr(blk.mlp, "n_used"):
                blk.mlp.n_used = int(k)
        self.config = dataclasses.replace(self.config, n_expert_used=int(k))
        self.reset()  # cached K/V were computed with the old routing
