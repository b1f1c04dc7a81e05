"""Terminal chat. The only module that draws with rich (besides progress bars)."""
from __future__ import annotations

import argparse
import sys

from .errors import FlashMoEError


def _history(model, messages: list[dict]) -> str:
    from .chat_template import ChatTemplateError, fallback_prompt, render

    template = model.file.metadata.get("tokenizer.chat_template")
    tok = model.tokenizer
    if not template:
        return fallback_prompt(messages)
    bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
    eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
    try:
        return render(template, messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    except ChatTemplateError as e:
        raise FlashMoEError(f"{model.file.path}: chat template: {e}") from None


def run_chat(a: argparse.Namespace) -> int:
    from rich.console import Console

    from .cli import load_model, sampling_kwargs

    console = Console(highlight=False)
    with console.status("loading model..."):
        model = load_model(a)
    c = model.config
    console.print(f"[bold]{model.file.path.name}[/] · {c.arch} · {c.n_layer} layers · ctx {model.n_ctx}")
    if not model.file.metadata.get("tokenizer.chat_template"):
        console.print("[yellow]this model has no chat template: using a plain 'role: text' layout[/]")
    console.print("[dim]Ctrl-C stops a reply, Ctrl-D quits.[/]")
    messages: list[dict] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    kw = sampling_kwargs(a)
    while True:
        try:
            user = console.input("[bold green]> [/]")
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print()
            continue
        if not user.strip():
            continue
        if user.strip() in ("/quit", "/exit"):
            return 0
        messages.append({"role": "user", "content": user})
        prompt = _history(model, messages)
        add_bos = model.tokenizer.add_bos
        ids = model.tokenizer.encode(prompt, add_special=add_bos, parse_special=True)
        reply = ""
        stats = None
        try:
            for chunk in model.generate(ids, max_tokens=a.n_predict, **kw):
                if chunk.text:
                    reply += chunk.text
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                if chunk.stats is not None:
                    stats = chunk.stats
        except KeyboardInterrupt:
            console.print("\n[yellow](stopped)[/]")
        except FlashMoEError as e:
            console.print(f"\n[red]error: {e}[/]")
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
        if stats is not None:
            console.print(f"[dim]{stats.summary()}[/]")
