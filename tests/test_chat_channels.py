"""gpt-oss's harmony channels in the chat: the splitter on synthetic token streams (markers cut
at every position, tool calls, plain text that merely looks like a marker), the message kept,
and the terminal view (reasoning dimmed, answer plain, no markers on screen)."""
from __future__ import annotations

import io

import pytest

from flashmoe_gguf.chat import ChannelSplitter

# a reply as gpt-oss's tokens decode it (control tokens keep their text)
TOKENS = ["<|channel|>", "analysis", "<|message|>", "The user", " asks 2+2", ". Easy.", "<|end|>",
          "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "It is", " **4**."]
RAW = "".join(TOKENS)


def _run(pieces):
    s = ChannelSplitter()
    out = []
    for p in pieces:
        out += s.feed(p)
    out += s.flush()
    return s, out


def _joined(out):
    text: dict = {}
    for ch, t in out:
        text[ch] = text.get(ch, "") + t
    return text


def test_token_stream_split_by_channel():
    s, out = _run(TOKENS)
    assert _joined(out) == {"analysis": "The user asks 2+2. Easy.", "final": "It is **4**."}
    assert [ch for ch, _ in out] == ["analysis"] * 3 + ["final"] * 2  # in order, nothing else
    assert s.message(RAW) == {"role": "assistant", "content": "It is **4**.", "thinking": "The user asks 2+2. Easy."}


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11])
def test_markers_cut_anywhere(size):
    """Text pieces that split markers (byte tokens, a tokenizer without these control tokens)."""
    _, out = _run([RAW[i : i + size] for i in range(0, len(RAW), size)])
    assert _joined(out) == {"analysis": "The user asks 2+2. Easy.", "final": "It is **4**."}


def test_tool_call_header_and_return():
    raw = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
           "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>")
    s, out = _run([raw])
    assert _joined(out) == {"analysis": "Need the weather.", "commentary": '{"city": "Paris"}'}
    _, out = _run(["<|channel|>final<|message|>Done.<|return|>"])
    assert _joined(out) == {"final": "Done."}


def test_plain_replies_pass_through():
    """No markers: everything comes out as it is, channel None, even text with '<|' in it."""
    text = "a <b> and a <| c |> d <|im_end|> e <|"
    s, out = _run([text[i : i + 2] for i in range(0, len(text), 2)])
    assert _joined(out) == {None: text} and not s.seen
    assert s.message(text) == {"role": "assistant", "content": text}


def test_held_back_only_while_a_marker_may_start():
    s = ChannelSplitter()
    assert s.feed("x <|chan") == [(None, "x ")]
    assert s.feed("nel|>final<|message|>hi") == [("final", "hi")]


def test_terminal_view_dims_the_reasoning():
    from rich.console import Console

    from flashmoe_gguf.repl import _ChannelViews

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system="standard", width=60, height=20)
    views = _ChannelViews(console, plain=False)
    for t in TOKENS:
        views.update(t)
    views.close()
    screen = buf.getvalue()
    assert "<|" not in screen and "analysis" not in screen
    assert "The user asks 2+2" in screen and "It is" in screen
    dim_at = screen.index("The user")
    assert "\x1b[2" in screen[max(0, dim_at - 20) : dim_at]  # dim (SGR 2) just before the reasoning
    assert "\x1b[2" not in screen[screen.rindex("It is") - 12 : screen.rindex("It is")]

    buf = io.StringIO()
    views = _ChannelViews(Console(file=buf, force_terminal=False, width=60), plain=True)
    for t in TOKENS:
        views.update(t)
    views.close()
    assert buf.getvalue() == "[analysis] The user asks 2+2. Easy.\nIt is **4**.\n"
