"""Chat without a terminal: prompts from the model's chat template, replies as OpenAI-style
message dicts, context-overflow trimming, conversations saved as JSON.

    model = Model.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    messages = [{"role": "user", "content": "Hello!"}]
    reply = model.chat(messages, stream=False, temperature=0)   # {"role": "assistant", "content": ...}
    for delta in (stream := model.chat(messages + [reply, {"role": "user", "content": "More."}])):
        print(delta["content"], end="")                           # OpenAI-style deltas
    stream.message, stream.finish_reason, stream.stats             # after the loop

Nothing here draws on the terminal; ``repl`` is the rich front end built on this module.
The model's KV cache keeps the tokens of the previous call, so a conversation that grows by one
turn only computes the new turn's tokens (``Model._eval`` reuses the common prefix).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from .chat_template import ChatTemplateError, fallback_prompt, render
from .errors import ContextOverflowError, FlashMoEError

if TYPE_CHECKING:
    from .model import GenerationStats, Model

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 512
# Keys of ours on a message; never shown to the template.
_PRIVATE_KEYS = ("stopped",)


# -- prompts ------------------------------------------------------------------------------------
def chat_template(model: "Model") -> str | None:
    """The model's Jinja chat template, or None when the GGUF has none."""
    t = model.file.metadata.get("tokenizer.chat_template")
    return t if isinstance(t, str) and t.strip() else None


def _for_template(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in _PRIVATE_KEYS} for m in messages]


def render_prompt(model: "Model", messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages``: the model's template (jinja2 sandbox), or the plain
    ``role: text`` layout of ``chat_template.fallback_prompt`` when the model has none."""
    template = chat_template(model)
    msgs = _for_template(messages)
    if template is None:
        return fallback_prompt(msgs, add_generation_prompt)
    tok = model.tokenizer
    bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
    eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
    try:
        return render(template, msgs, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
    except ChatTemplateError as e:
        raise FlashMoEError(f"{model.file.path.name}: {e}") from None


def encode_prompt(model: "Model", messages: list[dict]) -> list[int]:
    """Token ids of the prompt. Templates usually write the BOS text themselves; the tokenizer
    adds one only where the metadata asks for it and the text does not already start with it."""
    text = render_prompt(model, messages)
    tok = model.tokenizer
    ids = tok.encode(text, add_special=False, parse_special=True)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


def validate_messages(messages: Any) -> list[dict]:
    """Check OpenAI-style messages (a list of dicts with a known ``role`` and a string
    ``content``); FlashMoEError names the first bad one."""
    if not isinstance(messages, list):
        raise FlashMoEError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FlashMoEError(f"message {i} is not a dict: {m!r:.60}")
        if m.get("role") not in ROLES:
            raise FlashMoEError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise FlashMoEError(f"message {i} ({m['role']}) has no text content")
    return messages


@dataclass
class FittedPrompt:
    ids: list[int]  # the prompt tokens
    messages: list[dict]  # the messages that made it: the system prompt and the newest turns
    dropped: int  # how many of the oldest messages were left out to fit the context
    reserve: int  # tokens kept free for the reply


def reply_room(model: "Model", max_tokens: int) -> int:
    """Tokens to keep free for the reply: max_tokens, but at most half the context."""
    return max(1, min(max_tokens, model.n_ctx // 2))


def fit_context(model: "Model", messages: list[dict], max_tokens: int) -> FittedPrompt:
    """The prompt of ``messages``, leaving out the oldest turns (never the leading system
    prompt, never the last message) until prompt + room for the reply fits ``model.n_ctx``.
    Whole turns go: the first message dropped is followed by everything up to the next user
    message, so the conversation still starts with a user turn. When only the last message is
    left and the prompt still does not leave room for ``reserve`` tokens, it is accepted as long
    as one token of reply fits; otherwise ContextOverflowError."""
    reserve = reply_room(model, max_tokens)
    head = 1 if messages and messages[0].get("role") == "system" else 0
    system, rest = messages[:head], list(messages[head:])
    dropped = 0
    while True:
        msgs = system + rest
        ids = encode_prompt(model, msgs)
        if len(ids) + reserve <= model.n_ctx:
            return FittedPrompt(ids, msgs, dropped, reserve)
        if len(rest) <= 1:
            if len(ids) < model.n_ctx:
                return FittedPrompt(ids, msgs, dropped, model.n_ctx - len(ids))
            raise ContextOverflowError(
                f"the message is too long: the prompt has {len(ids)} tokens and the context holds {model.n_ctx}")
        n = 1
        while n < len(rest) - 1 and rest[n].get("role") != "user":
            n += 1
        rest = rest[n:]
        dropped += n


# -- replies ------------------------------------------------------------------------------------
class ChatStream:
    """A reply being generated. Iterating yields OpenAI-style deltas,
    ``{"role": "assistant", "content": piece}``; afterwards ``message`` is the whole reply,
    ``finish_reason`` is "stop", "length" or "interrupted" (``close()`` before the end),
    ``stats`` the GenerationStats, ``dropped`` how many of the oldest messages were left out
    to fit the context (the caller's list is never modified)."""

    def __init__(self, model: "Model", messages: list[dict], max_tokens: int = DEFAULT_MAX_TOKENS, **sampling):
        validate_messages(messages)
        if not messages:
            raise FlashMoEError("the conversation is empty")
        if max_tokens < 0:
            raise FlashMoEError(f"max_tokens must be >= 0, got {max_tokens}")
        self.model = model
        fitted = fit_context(model, messages, max_tokens)
        self.prompt_ids = fitted.ids
        self.dropped = fitted.dropped
        self.content = ""
        self.finish_reason: str | None = None
        self.stats: "GenerationStats | None" = None
        self._t0 = time.perf_counter()
        self._prev_stats = model.last_stats
        self._chunks = model.generate(fitted.ids, max_tokens=max_tokens, **sampling)
        self._it: Iterator[dict] | None = None

    @property
    def message(self) -> dict:
        return {"role": "assistant", "content": self.content}

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[dict]:
        if self._it is None:
            self._it = self._run()
        return self._it

    def _run(self) -> Iterator[dict]:
        for chunk in self._chunks:
            if chunk.text:
                self.content += chunk.text
                yield {"role": "assistant", "content": chunk.text}
            if chunk.stats is not None:
                self.stats = chunk.stats
                self.finish_reason = chunk.finish_reason
        if self.finish_reason is None:
            self.finish_reason = "length"

    def close(self) -> None:
        """Stop generating (the KV cache keeps what was computed): the reply so far is kept,
        ``finish_reason`` becomes "interrupted" and ``stats`` count what was done."""
        if self.done:
            return
        self._chunks.close()
        if self._it is not None:
            self._it.close()
        self.finish_reason = "interrupted"
        st = self.model.last_stats
        if st is self._prev_stats:  # stopped before the generator started
            st = None
        if st is not None and st.decode_tokens and not st.decode_seconds:
            st.decode_seconds = max(time.perf_counter() - self._t0 - st.ttft_seconds, 0.0)
        self.stats = st

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chat(model: "Model", messages: list[dict], stream: bool = True, max_tokens: int = DEFAULT_MAX_TOKENS,
         **sampling) -> ChatStream | dict:
    """The assistant's reply to ``messages`` (OpenAI-style dicts). ``stream=True`` returns a
    ChatStream to iterate; ``stream=False`` generates the whole reply and returns its message
    dict. ``sampling``: Model.generate's keywords (temperature, top_k, top_p, min_p,
    repeat_penalty, repeat_last_n, seed, stop)."""
    s = ChatStream(model, messages, max_tokens=max_tokens, **sampling)
    if stream:
        return s
    for _ in s:
        pass
    return s.message


# -- channels of a reply (gpt-oss's harmony format) -------------------------------------------
class ChannelSplitter:
    """Splits a streamed reply into (channel, text) pieces. gpt-oss writes its reasoning and its
    answer as harmony messages: ``<|channel|>analysis<|message|>...<|end|><|start|>assistant
    <|channel|>final<|message|>...<|return|>``. Text of a message comes out with its channel's
    name ("analysis", "commentary", "final"); headers (role, channel, ``to=`` and
    ``<|constrain|>`` parts) and markers never come out. Text before any marker, a model that
    writes none, comes out with channel None. A piece that ends inside a possible marker is held
    back until the next one (or ``flush``) tells."""

    MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")

    def __init__(self):
        self.channel: str | None = None  # channel of the message being read
        self.seen = False  # any marker so far
        self.texts: dict[str | None, str] = {}  # everything given out, by channel
        self._in_message = True  # text is message content (else: a header, or between messages)
        self._header = ""
        self._buf = ""

    def _held(self) -> int:
        """Length of the longest tail of the buffer that starts a marker."""
        for n in range(min(len(self._buf), max(map(len, self.MARKERS)) - 1), 0, -1):
            tail = self._buf[-n:]
            if any(m.startswith(tail) for m in self.MARKERS):
                return n
        return 0

    def _text(self, text: str, out: list) -> None:
        if not text:
            return
        if self._in_message:
            out.append((self.channel, text))
            self.texts[self.channel] = self.texts.get(self.channel, "") + text
        else:
            self._header += text

    def _marker(self, m: str) -> None:
        self.seen = True
        if m == "<|message|>":
            head = self._header.split("<|channel|>")[-1] if "<|channel|>" in self._header else ""
            name = head.strip().split(" ")[0] if head.strip() else ""
            self.channel = name or self.channel or "final"
            self._in_message, self._header = True, ""
        elif m in ("<|end|>", "<|return|>", "<|call|>"):
            self._in_message, self._header = False, ""
        elif m == "<|start|>":
            self._in_message, self._header = False, ""
        elif m == "<|channel|>":
            self._in_message = False
            self._header += m
        # <|constrain|>: part of a header

    def feed(self, piece: str) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        self._buf += piece
        while True:
            i = self._buf.find("<|")
            hit = next((m for m in self.MARKERS if self._buf.startswith(m, i)), None) if i >= 0 else None
            if hit is None:
                break
            self._text(self._buf[:i], out)
            self._marker(hit)
            self._buf = self._buf[i + len(hit):]
        keep = self._held()
        self._text(self._buf[: len(self._buf) - keep], out)
        self._buf = self._buf[len(self._buf) - keep:]
        return out

    def flush(self) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        self._text(self._buf, out)
        self._buf = ""
        return out

    def message(self, content: str) -> dict:
        """The assistant message to keep for a reply whose raw text is ``content``: with channels,
        the answer as content and the reasoning as ``thinking`` (the key gpt-oss's template reads)."""
        if not self.seen:
            return {"role": "assistant", "content": content}
        msg = {"role": "assistant", "content": self.texts.get("final", "") + self.texts.get(None, "")}
        if self.texts.get("analysis"):
            msg["thinking"] = self.texts["analysis"]
        return msg


# -- a conversation -----------------------------------------------------------------------------
class Conversation:
    """The messages of one chat, the system prompt first, with the reply in progress handled:
    ``ask`` adds the user message and starts the reply, ``finish`` stores it (a stopped
    reply is kept and marked ``"stopped": True``; the template never sees that key)."""

    def __init__(self, system: str | None = None):
        self.messages: list[dict] = []
        if system:
            self.messages.append({"role": "system", "content": system})

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    def set_system(self, text: str | None) -> None:
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self) -> None:
        """Forget every turn; keep the system prompt."""
        system = self.system
        self.messages = []
        self.set_system(system)

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "user")

    def ask(self, model: "Model", text: str, max_tokens: int = DEFAULT_MAX_TOKENS, **sampling) -> ChatStream:
        """Add the user's message and start the reply. Turns dropped to fit the context are
        removed from the conversation too (``stream.dropped`` says how many messages). On an
        error the user message is taken back."""
        self.messages.append({"role": "user", "content": text})
        try:
            stream = ChatStream(model, self.messages, max_tokens=max_tokens, **sampling)
        except BaseException:
            self.messages.pop()
            raise
        if stream.dropped:
            head = 1 if self.system is not None else 0
            del self.messages[head : head + stream.dropped]
        return stream

    def finish(self, stream: ChatStream) -> dict:
        """Store the reply of ``stream`` (closing it first if it is still running)."""
        if not stream.done:
            stream.close()
        msg = stream.message
        if stream.finish_reason == "interrupted":
            msg["stopped"] = True
        self.messages.append(msg)
        return msg

    # -- files ----------------------------------------------------------------------------------
    def to_json(self, **extra: Any) -> dict:
        return {"messages": self.messages, **extra}

    def save(self, path: str | os.PathLike, **extra: Any) -> None:
        """Write the conversation as JSON ``{"messages": [...], ...extra}`` (atomically)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_json(**extra), f, ensure_ascii=False, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise FlashMoEError(f"{path}: cannot save the conversation ({e.strerror})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Conversation":
        """Read a conversation written by ``save`` (or a bare JSON list of messages)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FlashMoEError(f"{path}: no such file") from None
        except OSError as e:
            raise FlashMoEError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FlashMoEError(f"{path}: not a JSON conversation ({e})") from None
        msgs = data.get("messages") if isinstance(data, dict) else data
        try:
            validate_messages(msgs)
        except FlashMoEError as e:
            raise FlashMoEError(f"{path}: {e}") from None
        if any(m["role"] == "system" for m in msgs[1:]):
            raise FlashMoEError(f"{path}: a system message may only come first")
        conv = cls()
        conv.messages = [dict(m) for m in msgs]
        return conv
