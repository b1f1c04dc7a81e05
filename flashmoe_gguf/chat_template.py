"""Chat prompts from the GGUF's Jinja template (``tokenizer.chat_template``).

Templates are written for Hugging Face transformers, so they are rendered the way it renders
them: jinja2's ImmutableSandboxedEnvironment with ``trim_blocks`` and ``lstrip_blocks``, the
loop-controls extension (``{% break %}``, ``{% continue %}``), a ``{% generation %}`` block
that renders its body, and the helpers templates call: ``raise_exception(msg)``,
``strftime_now(fmt)`` and a ``tojson`` filter that keeps non-ASCII characters
(``ensure_ascii=False``) and accepts ``indent``, ``separators`` and ``sort_keys``.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that fails (or refuses) to render."""


class _TemplateRaised(Exception):
    """What ``raise_exception`` raises inside a template."""


def _raise_exception(message: str = "") -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's part of a template for
    training masks; for a prompt it only renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"syntax error in the chat template, line {e.lineno}: {e.message}") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """The prompt that ``template`` makes of ``messages`` (dicts with ``role`` and
    ``content``). ``extra`` reaches the template as further variables (``tools``,
    ``enable_thinking``, ...). Raises ChatTemplateError on any failure."""
    tmpl = _compile(template)
    try:
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **extra)
    except _TemplateRaised as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
    except jinja2.TemplateError as e:   # undefined operations, sandbox violations, ...
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    except Exception as e:              # python errors inside expressions (None + str, ...)
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def _text(content: Any) -> str:
    """Message content as text; a list of parts (``{"type": "text", "text": ...}``) keeps its
    text parts."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def fallback_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """A plain layout for models without a template: one ``role: content`` line per message
    (content as it is, so it may span lines), then ``assistant:`` when a reply is wanted.
    Base models continue such a transcript reasonably; nothing model-specific is assumed."""
    lines = [f"{m.get('role', 'user')}: {_text(m.get('content'))}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)
