"""``flashmoe chat``: the terminal chat. The only module that draws with rich (besides progress
bars); the conversation itself (template, trimming, files) is ``chat.py``.

Screen: a header with the model's facts, then turns. A reply streams as Markdown: the last
screenful, which may still change as tokens arrive, is redrawn in a rich Live region at most
``_FPS`` times a second; lines that scrolled above it are printed once and never redrawn, so
nothing flickers and long replies scroll normally. After each reply a status line tells prompt
and decode speed, time to first token, the expert page-cache hit rate, bytes read from disk,
the process's resident memory and how full the context is.

Input goes through the stdlib's readline (line editing, history kept in a file). A line ending
in ``\\`` continues on the next; ``\"\"\"`` opens a block that ends at a line ending in ``\"\"\"``.
Ctrl-C while a reply streams stops it (the partial reply stays in the conversation, marked);
Ctrl-C at the prompt clears the line; Ctrl-D quits.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from .chat import ChannelSplitter, ChatStream, Conversation, encode_prompt
from .errors import FlashMoEError
from .info import facts, human_bytes, human_count

_FPS = 10  # redraws per second of the streaming region
_CODE_THEME = "monokai"
HELP = [
    ("/help", "this list"),
    ("/reset", "forget the conversation (the system prompt stays)"),
    ("/system [TEXT]", "show or set the system prompt"),
    ("/temp X", "temperature (0 = greedy)"),
    ("/top-p X", "nucleus sampling threshold, in (0, 1]"),
    ("/top-k N", "sample among the N likeliest tokens (0 = all)"),
    ("/max-tokens N", "longest reply, in tokens"),
    ("/experts [K]", "show or set the experts routed per token (MoE models)"),
    ("/stats", "speed, expert I/O, memory and context of the last reply"),
    ("/save FILE", "write the conversation as JSON"),
    ("/load FILE", "read a conversation written by /save"),
    ("/quit", "leave (or Ctrl-D)"),
]
MULTILINE_HELP = ('end a line with \\ to continue it; """ opens a block closed by """; '
                  "Ctrl-C stops a reply or clears the line")


class CommandError(Exception):
    """A bad command or value: one line on the screen, the chat goes on."""


@dataclass
class Settings:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int | None
    max_tokens: int

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n, seed=self.seed)


@dataclass
class ReplyMeasure:
    """What one reply cost, beyond GenerationStats: bytes read from disk, memory."""
    stats: object = None
    disk_bytes: int = 0
    expert_hit: float | None = None  # byte-weighted page-cache hit rate of the routed experts
    expert_read: int = 0  # expert bytes brought in from disk
    rss: int = 0
    finish: str | None = None
    dropped: int = 0
    ctx: int = 0  # tokens of the conversation in the context after the reply


# -- small helpers ------------------------------------------------------------------------------
def _process():
    import psutil

    return psutil.Process()


def _read_bytes(proc) -> int:
    try:
        return int(proc.io_counters().read_bytes)
    except (AttributeError, OSError, NotImplementedError):  # no /proc/self/io here
        return 0


def _rss(proc) -> int:
    try:
        return int(proc.memory_info().rss)
    except OSError:
        return 0


def _ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _resident_fraction(model) -> float | None:
    """The fraction of the model's tensor bytes that sit in the page cache now (mincore)."""
    try:
        from .expert_store import resident_pages

        got = total = 0
        for t in model.file:
            r, n = resident_pages(model.file.raw(t.name))
            got += r
            total += n
        return got / total if total else None
    except Exception:  # informative only: never let it break the chat
        return None


# -- header -------------------------------------------------------------------------------------
def header(model, console: Console) -> None:
    f = facts(model.file)
    c = f.config
    name = f" ({f.name})" if f.name else ""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="dim", justify="right")
    t.add_column()
    active = f" · {human_count(f.n_params_active)} active per token" if c.is_moe else ""
    t.add_row("model", Text.assemble((model.file.path.name, "bold"), (name, "dim")))
    t.add_row("", f"{c.arch} · {human_count(f.n_params)} parameters{active} · {c.n_layer} layers")
    if c.is_moe:
        t.add_row("experts", f"{c.n_expert} per layer, {c.n_expert_used} routed per token, "
                             f"{human_bytes(f.bytes_per_expert)} each · {human_bytes(f.expert_bytes)} of experts in all")
    else:
        t.add_row("experts", f"none (dense: all {human_count(f.n_params)} parameters run for every token)")
    total = sum(b for _, b in f.by_type.values()) or 1
    t.add_row("types", ", ".join(f"{k} {100 * b / total:.0f}%" for k, (_, b) in f.by_type.items() if b / total >= 0.005))
    ram = _ram()
    ratio = f.file_bytes / ram if ram else 0
    fits = "fits in RAM" if ratio < 0.8 else "larger than RAM: experts stream from disk" if ratio > 1 else "about RAM size"
    t.add_row("size", f"{human_bytes(f.file_bytes)} file · {human_bytes(ram)} RAM ({100 * ratio:.0f}%: {fits})")
    t.add_row("context", f"{model.n_ctx} tokens (trained on {c.n_ctx_train})")
    console.print(t)


# -- input --------------------------------------------------------------------------------------
class LineReader:
    """Lines from the terminal through readline: editing, history (kept in ``history_file``),
    and the prompt's colour codes wrapped so readline measures the prompt right."""

    def __init__(self, color: bool, history_file: str | None):
        self.history_file = history_file
        self.readline = None
        try:
            import readline

            self.readline = readline
        except ImportError:  # no readline on this platform: plain input()
            pass
        if self.readline is not None and history_file:
            try:
                self.readline.read_history_file(history_file)
            except (OSError, ValueError):
                pass
            self.readline.set_history_length(1000)
        if color:
            self.prompt = "\001\033[1;32m\002> \001\033[0m\002"
            self.cont = "\001\033[2m\002. \001\033[0m\002"
        else:
            self.prompt, self.cont = "> ", ". "

    def save_history(self) -> None:
        if self.readline is None or not self.history_file:
            return
        try:
            Path(self.history_file).parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.history_file)
        except OSError:
            pass

    def read(self) -> str:
        """One message (several lines when continued). EOFError on Ctrl-D, KeyboardInterrupt
        on Ctrl-C."""
        line = input(self.prompt)
        if line.lstrip().startswith('"""'):
            body = line.lstrip()[3:]
            if body.rstrip().endswith('"""') and body.strip():
                return body.rstrip()[:-3]
            lines = [body] if body else []
            while True:
                nxt = input(self.cont)
                if nxt.rstrip().endswith('"""'):
                    lines.append(nxt.rstrip()[:-3])
                    return "\n".join(lines).strip("\n")
                lines.append(nxt)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = input(self.cont)
        lines.append(line)
        return "\n".join(lines)


# -- output: a reply streamed as Markdown -------------------------------------------------------
class MarkdownStream:
    """Draws a growing Markdown text. The bottom ``window`` lines live in a Live region that is
    redrawn (at most _FPS times a second); lines above it are printed once, for good."""

    def __init__(self, console: Console, style: str = "none"):
        self.console = console
        self.style = style
        self.window = max(3, console.size.height - 3)
        self.printed = 0  # lines already printed for good
        self.text = ""
        self._last = 0.0
        self.live = Live(Text(""), console=console, auto_refresh=False, transient=True,
                         vertical_overflow="crop", redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def _lines(self) -> list[list[Segment]]:
        md = Markdown(self.text, code_theme=_CODE_THEME, style=self.style)
        lines = self.console.render_lines(md, self.console.options, pad=False)
        while lines and not "".join(s.text for s in lines[-1]).strip():
            lines.pop()  # trailing blank lines
        return lines

    def update(self, piece: str) -> None:
        self.text += piece
        now = time.monotonic()
        if now - self._last < 1.0 / _FPS:
            return
        self._last = now
        self._draw(final=False)

    def _draw(self, final: bool) -> None:
        lines = self._lines()
        stable = len(lines) if final else max(len(lines) - self.window, 0)
        done = lines[self.printed:stable]
        self.live.update(_Lines(lines[stable:]) if not final else Text(""), refresh=not done)
        if done:  # printed above the Live region, which is redrawn below it
            self.live.console.print(_Lines(done))
            self.printed = stable

    def close(self, text: str | None = None) -> None:
        """Draw the final ``text`` (default: what came through ``update``) and stop."""
        if text is not None:
            self.text = text
        try:
            self._draw(final=True)
        finally:
            self.live.stop()


class _Lines:
    """Pre-rendered lines as a rich renderable."""

    def __init__(self, lines: list[list[Segment]]):
        self.lines = lines

    def __rich_console__(self, console, options):
        for line in self.lines:
            yield from line
            yield Segment.line()


class PlainStream:
    """Raw text as it comes (not a terminal, or --plain)."""

    def __init__(self, console: Console):
        self.file = console.file
        self.text = ""

    def update(self, piece: str) -> None:
        self.file.write(piece)
        self.file.flush()
        self.text += piece

    def close(self, text: str | None = None) -> None:
        if text is not None and text.startswith(self.text):
            self.update(text[len(self.text):])
        if self.text and not self.text.endswith("\n"):
            self.file.write("\n")
        self.file.flush()


class _ChannelViews:
    """A reply drawn by channel (gpt-oss's harmony messages, see chat.ChannelSplitter): the
    reasoning ("analysis", tool "commentary") dimmed, the answer as usual; markers never shown.
    A reply without channels is drawn as it comes."""

    def __init__(self, console: Console, plain: bool):
        self.console, self.plain = console, plain
        self.split = ChannelSplitter()
        self.view: MarkdownStream | PlainStream | None = None
        self.kind: str | None = None

    def _show(self, channel: str | None, text: str) -> None:
        kind = "answer" if channel in (None, "final") else "thinking"
        if kind != self.kind:
            if self.view is not None:
                self.view.close()
            if self.plain:
                self.view = PlainStream(self.console)
                if kind == "thinking":  # no styles here: say what it is
                    self.view.update(f"[{channel}] ")
            else:
                self.view = MarkdownStream(self.console, style="dim italic" if kind == "thinking" else "none")
            self.kind = kind
        self.view.update(text)

    def update(self, piece: str) -> None:
        for channel, text in self.split.feed(piece):
            self._show(channel, text)

    def close(self) -> None:
        for channel, text in self.split.flush():
            self._show(channel, text)
        if self.view is not None:
            self.view.close()


@contextmanager
def _no_echo():
    """Keys typed while a reply streams are not echoed (they would break the Live region);
    they stay queued for the next prompt, where readline shows them."""
    try:
        import termios

        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd) if os.isatty(fd) else None
    except Exception:  # no termios, no stdin, termios.error
        old = None
    if old is None:  # not a terminal
        yield
        return
    new = list(old)
    new[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, new)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


class _Interrupts:
    """SIGINT while a reply streams. While the main thread is inside the model (``in_model``)
    KeyboardInterrupt is raised at once: unwinding there is safe (the KV cache only counts
    positions whose computation finished) and the reply stops without waiting for the next
    token. While it draws, Ctrl-C only sets ``stop``, so that no half-drawn screen is left."""

    def __init__(self):
        self.stop = False
        self.in_model = False
        self._old = None

    def _handler(self, signum, frame):
        if self.in_model:
            raise KeyboardInterrupt
        self.stop = True

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


# -- the session --------------------------------------------------------------------------------
@dataclass
class Session:
    model: object
    console: Console
    settings: Settings
    conv: Conversation
    plain: bool = False
    last: ReplyMeasure | None = None
    commands: dict[str, Callable[[str], None]] = field(default_factory=dict)

    def __post_init__(self):
        self.proc = _process()
        self.commands = {
            "/help": self.cmd_help, "/?": self.cmd_help, "/reset": self.cmd_reset, "/clear": self.cmd_reset,
            "/system": self.cmd_system, "/temp": self.cmd_temp, "/top-p": self.cmd_top_p,
            "/top-k": self.cmd_top_k, "/max-tokens": self.cmd_max_tokens, "/experts": self.cmd_experts,
            "/stats": self.cmd_stats, "/save": self.cmd_save, "/load": self.cmd_load,
        }

    # -- messages to the screen ---------------------------------------------------------------
    def note(self, text: str, style: str = "dim") -> None:
        self.console.print(Text(text, style=style))

    def error(self, text: str) -> None:
        self.console.print(Text("error: ", style="bold red") + Text(text.splitlines()[0] if text else "?"))

    # -- one reply ----------------------------------------------------------------------------
    def reply(self, text: str) -> None:
        model, st = self.model, self.settings
        before = _read_bytes(self.proc)
        try:
            stream = self.conv.ask(model, text, max_tokens=st.max_tokens, **st.sampling())
        except FlashMoEError as e:
            self.error(str(e))
            return
        if stream.dropped:
            self.note(f"context full ({model.n_ctx} tokens): left out the {stream.dropped} oldest messages"
                      + (", kept the system prompt" if self.conv.system else ""), style="yellow")
        plain = self.plain or not self.console.is_terminal
        views = _ChannelViews(self.console, plain)
        error = None
        with _no_echo(), _Interrupts() as intr:
            deltas = iter(stream)
            try:
                while not intr.stop:
                    intr.in_model = True
                    try:
                        delta = next(deltas)
                    except StopIteration:
                        break
                    finally:
                        intr.in_model = False
                    views.update(delta["content"])
            except KeyboardInterrupt:
                pass
            except FlashMoEError as e:  # nothing expected here, but the chat must go on
                error = e
            finally:
                intr.in_model = False
                if not stream.done:
                    stream.close()
                views.close()
        msg = self.conv.finish(stream)
        if views.split.seen:  # keep the answer as the content, the reasoning apart
            msg.update(views.split.message(msg["content"]))
        if error is not None:
            self.error(str(error))
        if msg.get("stopped"):
            self.note("[stopped: the partial reply stays in the conversation]", style="yellow")
        elif stream.finish_reason == "length":
            self.note(f"[cut at {st.max_tokens} tokens]" if len(stream.prompt_ids) + st.max_tokens < model.n_ctx
                      else "[the context is full]", style="yellow")
        m = ReplyMeasure(stats=stream.stats, disk_bytes=max(_read_bytes(self.proc) - before, 0),
                         rss=_rss(self.proc), finish=stream.finish_reason, dropped=stream.dropped,
                         ctx=len(stream.prompt_ids) + (stream.stats.decode_tokens if stream.stats else 0))
        if model.store is not None:
            t = model.store.stats.totals()
            m.expert_hit = model.store.stats.hit_rate if t.expert_bytes else None
            m.expert_read = t.miss_bytes
        self.last = m
        self.console.print(self.status_line(m))

    def status_line(self, m: ReplyMeasure) -> Text:
        s = m.stats
        parts = []
        if s is not None:
            parts.append(f"prompt {s.prompt_tokens} tok {s.prompt_tps:.1f} tok/s")
            parts.append(f"decode {s.decode_tokens} tok {s.decode_tps:.1f} tok/s")
            parts.append(f"TTFT {s.ttft_seconds:.2f} s")
        if self.model.store is not None:
            hit = "-" if m.expert_hit is None else f"{100 * m.expert_hit:.1f}%"
            parts.append(f"experts in cache {hit}")
        parts.append(f"disk {_mb(m.disk_bytes)}")
        parts.append(f"RSS {m.rss / 1e6:.0f} MB")
        parts.append(f"ctx {m.ctx}/{self.model.n_ctx}")
        # wrap between the parts, never inside one
        width = max(self.console.size.width - 1, 20)
        lines = [parts[0]]
        for part in parts[1:]:
            if len(lines[-1]) + 3 + len(part) <= width:
                lines[-1] += " · " + part
            else:
                lines.append(part)
        return Text("\n".join(lines), style="dim", no_wrap=True, overflow="ellipsis")

    # -- commands -----------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False when it is /quit."""
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/quit", "/exit", "/q", "/bye"):
            return False
        fn = self.commands.get(name)
        try:
            if fn is None:
                raise CommandError(f"unknown command {name} (/help lists them)")
            fn(arg)
        except (CommandError, FlashMoEError) as e:
            self.error(str(e))
        return True

    @staticmethod
    def _number(name: str, arg: str, lo: float, hi: float, lo_open: bool = False) -> float:
        try:
            v = float(arg)
        except ValueError:
            v = float("nan")
        if not (v == v) or v > hi or v < lo or (lo_open and v == lo):
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise CommandError(f"{name} expects a number in {rng}, got {arg!r}" if arg else f"{name} expects a number in {rng}")
        return v

    @staticmethod
    def _integer(name: str, arg: str, lo: int, hi: int | None = None) -> int:
        try:
            v = int(arg)
        except ValueError:
            v = None
        if v is None or v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise CommandError(f"{name} expects an integer {rng}, got {arg!r}" if arg else f"{name} expects an integer {rng}")
        return v

    def cmd_help(self, arg: str) -> None:
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold cyan")
        t.add_column()
        for cmd, what in HELP:
            t.add_row(cmd, what)
        self.console.print(t)
        self.note(MULTILINE_HELP)

    def cmd_reset(self, arg: str) -> None:
        self.conv.reset()
        self.note("conversation cleared" + (" (system prompt kept)" if self.conv.system else ""))

    def cmd_system(self, arg: str) -> None:
        if not arg:
            cur = self.conv.system
            self.note(f"system prompt: {cur}" if cur else "no system prompt (the template's default applies, if any)")
            return
        self.conv.set_system(arg)
        self.note("system prompt set")

    def cmd_temp(self, arg: str) -> None:
        self.settings.temperature = self._number("/temp", arg, 0.0, 100.0)
        self.note(f"temperature {self.settings.temperature:g}" + (" (greedy)" if self.settings.temperature == 0 else ""))

    def cmd_top_p(self, arg: str) -> None:
        self.settings.top_p = self._number("/top-p", arg, 0.0, 1.0, lo_open=True)
        self.note(f"top-p {self.settings.top_p:g}")

    def cmd_top_k(self, arg: str) -> None:
        self.settings.top_k = self._integer("/top-k", arg, 0)
        self.note(f"top-k {self.settings.top_k}" + (" (off)" if self.settings.top_k == 0 else ""))

    def cmd_max_tokens(self, arg: str) -> None:
        self.settings.max_tokens = self._integer("/max-tokens", arg, 1)
        self.note(f"replies of at most {self.settings.max_tokens} tokens")

    def cmd_experts(self, arg: str) -> None:
        c = self.model.config
        if not c.is_moe:
            raise CommandError("this model has no experts (dense)")
        if not arg:
            self.note(f"{c.n_expert_used} of {c.n_expert} experts per token")
            return
        k = self._integer("/experts", arg, 1, c.n_expert)
        self.model.set_experts_per_token(k)
        self.note(f"{k} of {c.n_expert} experts per token from now on (the context is recomputed)")

    def cmd_stats(self, arg: str) -> None:
        from .cli import io_summary

        model, m = self.model, self.last
        t = Table.grid(padding=(0, 2))
        t.add_column(style="dim", justify="right")
        t.add_column()
        if m is None or m.stats is None:
            t.add_row("last reply", "none yet")
        else:
            s = m.stats
            t.add_row("prompt", f"{s.prompt_tokens} tokens computed, {s.cached_tokens} reused from the KV cache, "
                                f"{s.prompt_seconds:.2f} s ({s.prompt_tps:.1f} tok/s)")
            t.add_row("decode", f"{s.decode_tokens} tokens, {s.decode_seconds:.2f} s ({s.decode_tps:.1f} tok/s), "
                                f"time to first token {s.ttft_seconds:.2f} s, ended: {m.finish}")
            t.add_row("disk", f"{_mb(m.disk_bytes)} read by the process during the reply")
        t.add_row("experts", io_summary(model) if model.store is not None and model.store.stats.steps
                  else ("none (dense model)" if model.store is None else "no decode step yet"))
        res = _resident_fraction(model)
        t.add_row("memory", f"RSS {_mb(_rss(self.proc))} · model in page cache "
                            f"{'?' if res is None else f'{100 * res:.0f}%'} of {human_bytes(model.file.file_size)}")
        used = len(encode_prompt(model, self.conv.messages)) if self.conv.messages else 0
        t.add_row("context", f"{used} of {model.n_ctx} tokens · {len(self.conv.messages)} messages, "
                             f"{self.conv.turns} turns · {len(model._cached)} tokens in the KV cache")
        st = self.settings
        exp = f" · experts {model.config.n_expert_used}/{model.config.n_expert}" if model.config.is_moe else ""
        t.add_row("sampling", f"temp {st.temperature:g} · top-k {st.top_k} · top-p {st.top_p:g} · min-p {st.min_p:g}"
                              f" · max {st.max_tokens} tokens{exp}")
        self.console.print(t)

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise CommandError("/save expects a file name")
        path = os.path.expanduser(arg)
        self.conv.save(path, model=self.model.file.path.name)
        self.note(f"saved {len(self.conv.messages)} messages to {arg}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise CommandError("/load expects a file name")
        conv = Conversation.load(os.path.expanduser(arg))
        self.conv = conv
        self.note(f"loaded {len(conv.messages)} messages ({conv.turns} turn{'s' if conv.turns != 1 else ''}) from {arg}")
        for msg in conv.messages[-2:]:
            body = msg["content"].replace("\n", " ")
            self.note(f"  {msg['role']}: {body[:100]}{'…' if len(body) > 100 else ''}")


# -- start-up -----------------------------------------------------------------------------------
def _load(a: argparse.Namespace, console: Console, conv: Conversation):
    """Load the model and warm it up (kernels compiled or read from Numba's cache, the system
    prompt computed into the KV cache), with a progress display."""
    from .cli import load_model

    name = Path(a.model).name
    size = ""
    try:
        size = f" ({human_bytes(os.path.getsize(a.model))})"
    except OSError:
        pass
    cols = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console, transient=True) as prog:
        t1 = prog.add_task(f"loading {name}{size}", total=1)
        t2 = prog.add_task("warming up", total=1, start=False)
        model = load_model(a)
        prog.update(t1, completed=1)
        prog.start_task(t2)
        if a.warmup:
            t0 = time.perf_counter()
            ids = encode_prompt(model, conv.messages + [{"role": "user", "content": "Hi"}])
            for _ in model.generate(ids, max_tokens=1, temperature=0):
                pass
            warm = time.perf_counter() - t0
        prog.update(t2, completed=1)
    return model, (warm if a.warmup else None)


def run_chat(a: argparse.Namespace) -> int:
    color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb"
    console = Console(highlight=False)
    conv = Conversation(system=a.system)
    settings = Settings(a.temp, a.top_k, a.top_p, a.min_p, a.repeat_penalty, a.repeat_last_n, a.seed, a.n_predict)
    model, warm = _load(a, console, conv)
    header(model, console)
    from .chat import chat_template

    if chat_template(model) is None:
        console.print(Text("this model has no chat template: using a plain 'role: text' layout, "
                           "which it may follow poorly", style="yellow"))
    loaded = f"warmed up in {warm:.1f} s · " if warm is not None else ""
    console.print(Text(f"{loaded}/help for commands · Ctrl-C stops a reply · Ctrl-D quits", style="dim"))
    session = Session(model, console, settings, conv, plain=a.plain)
    history = a.history if a.history is not None else os.path.join(Path.home(), ".flashmoe_history")
    reader = LineReader(color, history or None)
    try:
        while True:
            console.print()
            try:
                text = reader.read()
            except EOFError:
                console.print()
                return 0
            except KeyboardInterrupt:
                console.print(Text("^C", style="dim"))
                continue
            if not text.strip():
                continue
            try:
                if text.lstrip().startswith("/") and "\n" not in text.strip():
                    if not session.command(text):
                        return 0
                    continue
                session.reply(text)
            except KeyboardInterrupt:  # between the reply's end and the prompt: nothing to undo
                console.print()
    finally:
        reader.save_history()
