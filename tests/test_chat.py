"""The chat: ``flashmoe chat`` driven in a pseudo-terminal on SmolLM2, and the rich-free chat API
(``Model.chat``, context trimming, conversations saved as JSON) without a terminal."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flashmoe_gguf import Model
from flashmoe_gguf.chat import ChatStream, Conversation, encode_prompt, fit_context, render_prompt
from flashmoe_gguf.chat_template import render
from flashmoe_gguf.errors import ContextOverflowError, FlashMoEError
from tiny_gguf import random_llama_state, write_state_gguf

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(not MODEL.exists(), reason="run `make models` to fetch SmolLM2 (make test does)")


@pytest.fixture(scope="module")
def smollm2() -> Model:
    # One compute thread: on a busy machine Numba's parallel regions wait for descheduled
    # threads and decoding gets tens of times slower. The process-wide setting is restored after.
    import numba

    if not MODEL.exists():
        pytest.skip("run `make models` to fetch SmolLM2 (make test does)")
    n = numba.get_num_threads()
    yield Model.load(MODEL, n_ctx=512, threads=1)
    numba.set_num_threads(n)


def _template_ids(model: Model, messages: list[dict]) -> list[int]:
    """The prompt made directly with chat_template.render and the tokenizer (not through chat.py)."""
    text = render(model.file.metadata["tokenizer.chat_template"], messages, add_generation_prompt=True)
    return model.tokenizer.encode(text, add_special=False, parse_special=True)


# -- Model.chat -----------------------------------------------------------------------------------
@needs_smollm2
def test_model_chat_streams_openai_deltas(smollm2):
    messages = [{"role": "user", "content": "My name is Zorblax."}]
    smollm2.reset()  # both replies below computed from an empty cache: the same sums in the same order
    stream = smollm2.chat(messages, max_tokens=6, temperature=0)
    assert isinstance(stream, ChatStream)
    deltas = list(stream)
    assert deltas and all(set(d) == {"role", "content"} and d["role"] == "assistant" for d in deltas)
    text = "".join(d["content"] for d in deltas)
    assert stream.message == {"role": "assistant", "content": text}
    assert stream.finish_reason in ("stop", "length") and stream.stats.decode_tokens >= 1
    assert stream.dropped == 0 and messages == [{"role": "user", "content": "My name is Zorblax."}]
    # the same greedy reply as generate() on the template rendered independently
    smollm2.reset()
    ref = "".join(c.text for c in smollm2.generate(_template_ids(smollm2, messages), max_tokens=6, temperature=0))
    assert text == ref
    assert "Zorblax" in text
    # stream=False: the message dict itself
    smollm2.reset()
    assert smollm2.chat(messages, stream=False, max_tokens=6, temperature=0) == stream.message


@needs_smollm2
def test_model_chat_close_keeps_partial_reply(smollm2):
    stream = smollm2.chat([{"role": "user", "content": "Write a long essay about the history of Rome."}],
                          max_tokens=50, temperature=0)
    it = iter(stream)
    first = next(it)["content"] + next(it)["content"]
    stream.close()
    assert stream.finish_reason == "interrupted" and stream.message["content"] == first
    assert stream.stats is not None and stream.stats.decode_tokens == 2
    with pytest.raises(StopIteration):
        next(it)


@needs_smollm2
def test_model_chat_rejects_bad_messages(smollm2):
    for bad in ([], [{"role": "robot", "content": "hi"}], [{"role": "user"}], "hello", [["user", "hi"]]):
        with pytest.raises(FlashMoEError):
            smollm2.chat(bad)


# -- trimming -------------------------------------------------------------------------------------
def _long_conversation(n_turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "You are a terse assistant."}]
    for i in range(n_turns):
        msgs.append({"role": "user", "content": f"Question {i}: " + "tell me about the sea and the sky " * 4})
        msgs.append({"role": "assistant", "content": f"Answer {i}: " + "the sea is blue and wide " * 5})
    msgs.append({"role": "user", "content": "And the last question?"})
    return msgs


@needs_smollm2
def test_overflow_drops_oldest_turns_and_keeps_the_system_prompt(smollm2):
    msgs = _long_conversation(12)
    max_tokens = 200  # room kept for the reply: min(200, n_ctx // 2)
    assert len(_template_ids(smollm2, msgs)) + max_tokens > smollm2.n_ctx  # it does overflow
    fitted = fit_context(smollm2, msgs, max_tokens)
    assert fitted.dropped > 0 and fitted.dropped % 2 == 0  # whole turns (user + assistant)
    assert fitted.messages[0] == msgs[0]  # system prompt kept
    assert fitted.messages[1]["role"] == "user"
    assert fitted.messages[1:] == msgs[1 + fitted.dropped:]  # the newest turns, in order
    assert fitted.ids == _template_ids(smollm2, fitted.messages)
    assert len(fitted.ids) + max_tokens <= smollm2.n_ctx
    # as few as needed: keeping one more turn would not fit
    one_more = [msgs[0]] + msgs[fitted.dropped - 1:]
    assert len(_template_ids(smollm2, one_more)) + max_tokens > smollm2.n_ctx

    # a conversation forgets the dropped turns, says so, and still replies
    conv = Conversation(system=msgs[0]["content"])
    conv.messages = [dict(m) for m in msgs[:-1]]
    stream = conv.ask(smollm2, msgs[-1]["content"], max_tokens=max_tokens, temperature=0)
    assert stream.dropped == fitted.dropped
    assert conv.messages == fitted.messages
    stream.close()
    conv.finish(stream)
    assert conv.messages[-1]["role"] == "assistant" and conv.messages[-1]["stopped"] is True


@needs_smollm2
def test_overflow_of_one_message_is_an_error_not_a_crash(smollm2):
    conv = Conversation(system="Be brief.")
    conv.messages.append({"role": "user", "content": "hi"})
    conv.messages.append({"role": "assistant", "content": "hello"})
    before = [dict(m) for m in conv.messages]
    with pytest.raises(ContextOverflowError, match="too long"):
        conv.ask(smollm2, "word " * 2000, max_tokens=16)
    assert conv.messages == before  # the user message was taken back
    # a long message that leaves less than the reply room but some: accepted, shorter reply
    fitted = fit_context(smollm2, [{"role": "user", "content": "word " * 400}], 200)
    assert smollm2.n_ctx - 200 < len(fitted.ids) < smollm2.n_ctx and fitted.reserve == smollm2.n_ctx - len(fitted.ids)


# -- files ----------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    conv = Conversation(system="Réponds en français.")
    conv.messages += [{"role": "user", "content": "Line one\nline two — «quoted» 🙂"},
                      {"role": "assistant", "content": "```python\nprint(1)\n```", "stopped": True},
                      {"role": "user", "content": ""}]
    path = tmp_path / "conv.json"
    conv.save(path, model="m.gguf")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["model"] == "m.gguf" and data["messages"] == conv.messages
    back = Conversation.load(path)
    assert back.messages == conv.messages and back.system == "Réponds en français." and back.turns == 2
    # a bare list of messages loads too
    path.write_text(json.dumps(conv.messages[1:]), encoding="utf-8")
    assert Conversation.load(path).messages == conv.messages[1:]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("{not json", "not a JSON conversation"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "role 'wizard'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "no text content"),
    ('{"messages": "hello"}', "must be a list"),
    ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]', "only come first"),
])
def test_load_bad_files(tmp_path, content, match):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(FlashMoEError, match=match) as e:
        Conversation.load(path)
    assert str(path) in str(e.value)


def test_save_to_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FlashMoEError, match="cannot save"):
        Conversation().save(tmp_path / "no" / "such" / "c.json")


def test_conversation_system_and_reset():
    conv = Conversation()
    assert conv.system is None
    conv.set_system("A")
    conv.messages.append({"role": "user", "content": "q"})
    conv.set_system("B")
    assert conv.messages == [{"role": "system", "content": "B"}, {"role": "user", "content": "q"}]
    conv.reset()
    assert conv.messages == [{"role": "system", "content": "B"}]
    conv.set_system(None)
    assert conv.messages == []


# -- templates ------------------------------------------------------------------------------------
def _fake_model(template, n_ctx: int = 64):
    tok = SimpleNamespace(bos_id=None, eos_id=None, add_bos=False, decode=lambda ids: "",
                          encode=lambda text, add_special, parse_special: list(text.encode()))
    md = {} if template is None else {"tokenizer.chat_template": template}
    return SimpleNamespace(file=SimpleNamespace(metadata=md, path=Path("fake.gguf")), tokenizer=tok, n_ctx=n_ctx)


def test_no_template_uses_the_plain_layout():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi", "stopped": True}]
    assert render_prompt(_fake_model(None), msgs) == "system: S\nuser: hi\nassistant:"
    assert render_prompt(_fake_model("   "), msgs) == "system: S\nuser: hi\nassistant:"


def test_private_keys_never_reach_the_template():
    tmpl = "{% for m in messages %}{{ m | tojson }};{% endfor %}"
    out = render_prompt(_fake_model(tmpl), [{"role": "assistant", "content": "x", "stopped": True}])
    assert out == '{"role": "assistant", "content": "x"};'


def test_broken_template_is_a_flashmoe_error():
    with pytest.raises(FlashMoEError, match="fake.gguf"):
        render_prompt(_fake_model("{% for m in messages %}"), [{"role": "user", "content": "x"}])
    with pytest.raises(FlashMoEError, match="refused"):
        render_prompt(_fake_model("{{ raise_exception('no system role') }}"), [{"role": "user", "content": "x"}])


def test_fit_context_on_a_tiny_context():
    model = _fake_model(None, n_ctx=80)  # one token per byte
    msgs = [{"role": "system", "content": "S"}] + [{"role": r, "content": "x" * 8} for r in ("user", "assistant") * 3]
    msgs.append({"role": "user", "content": "last"})
    # bytes: system 10, each turn 15 + 20, the last 11 + "assistant:" 10 -> 136; without two turns 66
    fitted = fit_context(model, msgs, max_tokens=10)
    assert fitted.messages == msgs[:1] + msgs[5:]
    assert len(fitted.ids) == 66 and fitted.dropped == 4
    with pytest.raises(ContextOverflowError):
        fit_context(model, [{"role": "user", "content": "y" * 100}], max_tokens=10)


# -- experts per token ----------------------------------------------------------------------------
def test_set_experts_per_token_matches_loading_with_k(tmp_path):
    cfg, sd = random_llama_state(seed=3, n_expert=4, n_expert_used=2)
    path = write_state_gguf(cfg, sd, tmp_path / "moe.gguf", "llama")
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=12)
    model = Model.load(path)
    top2 = model.logits(ids)
    model.set_experts_per_token(1)
    assert model.config.n_expert_used == 1 and all(b.mlp.n_used == 1 for b in model.net.blocks)
    top1 = model.logits(ids)
    ref = Model.load(path, experts_per_token=1).logits(ids)
    np.testing.assert_allclose(top1, ref, rtol=0, atol=1e-5)
    assert np.abs(top1 - top2).max() > 1e-3  # routing to fewer experts changes the result
    for bad in (0, 5, 1.5, "2", True):
        with pytest.raises(FlashMoEError):
            model.set_experts_per_token(bad)
    assert model.config.n_expert_used == 1


def test_set_experts_per_token_on_a_dense_model(tmp_path):
    cfg, sd = random_llama_state(seed=4)
    model = Model.load(write_state_gguf(cfg, sd, tmp_path / "dense.gguf", "llama"))
    with pytest.raises(FlashMoEError, match="no experts"):
        model.set_experts_per_token(1)


# -- the terminal chat in a pseudo-terminal -------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\x1b\][^\x07]*\x07|[\x00-\x08\x0e-\x1f]")


class Screen:
    """What the chat printed, escape codes stripped; ``wait`` reads until a text shows up and
    returns everything since the previous ``wait``."""

    def __init__(self, child):
        self.child = child
        self.raw = ""
        self.mark = 0

    @property
    def text(self) -> str:
        return _ANSI.sub("", self.raw).replace("\r", "")

    def wait(self, needle: str, timeout: float = 120) -> str:
        import pexpect

        end = time.monotonic() + timeout
        while needle not in self.text[self.mark:]:
            if time.monotonic() > end:
                raise AssertionError(f"{needle!r} did not appear; the screen since the last step:\n"
                                     f"{self.text[self.mark:][-3000:]}")
            try:
                self.raw += self.child.read_nonblocking(65536, timeout=0.2)
            except pexpect.TIMEOUT:
                pass
            except pexpect.EOF:
                raise AssertionError(f"the chat exited while waiting for {needle!r}:\n{self.text[-3000:]}") from None
        text = self.text
        i = text.index(needle, self.mark) + len(needle)
        out, self.mark = text[self.mark:i], i
        return out

    def wait_output(self, timeout: float = 120) -> None:
        """Until something visible is printed after the mark."""
        import pexpect

        end = time.monotonic() + timeout
        while not self.text[self.mark:].strip():
            if time.monotonic() > end:
                raise AssertionError("nothing appeared")
            try:
                self.raw += self.child.read_nonblocking(65536, timeout=0.1)
            except pexpect.TIMEOUT:
                pass

    def prompt(self, timeout: float = 120) -> str:
        """Up to the next input prompt (a line that is just '> ')."""
        return self.wait("\n> ", timeout)

    def send(self, line: str) -> None:
        self.child.send(line + "\r")


def _spawn(args: list[str], tmp_path: Path):
    pexpect = pytest.importorskip("pexpect")
    exe = shutil.which("flashmoe", path=str(Path(sys.executable).parent))
    cmd, argv = (exe, args) if exe else (sys.executable, ["-m", "flashmoe_gguf.cli", *args])
    env = dict(os.environ, HOME=str(tmp_path), TERM="xterm-256color", COLUMNS="100", LINES="40")
    env.pop("NO_COLOR", None)
    # the chat gets SIGINT's default disposition whatever the suite's: a suite started in the
    # background by a shell without job control ignores SIGINT, the child would inherit that,
    # and Ctrl-C (which the chat leaves ignored then, as nohup asks) would never arrive
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return pexpect.spawn(cmd, argv, cwd=str(tmp_path), env=env, encoding="utf-8", dimensions=(40, 100),
                             timeout=60)
    finally:
        signal.signal(signal.SIGINT, old)


@needs_smollm2
def test_terminal_chat_session(tmp_path):
    t0 = time.monotonic()
    child = _spawn(["chat", "-m", str(MODEL), "--temp", "0", "-n", "10", "-c", "1024", "-t", "1"], tmp_path)
    s = Screen(child)
    try:
        head = s.wait("/help for commands", timeout=90)
        assert "llama" in head and "134.52M parameters" in head and "RAM" in head and "Q4_1" in head
        s.prompt()

        # two turns; the second answer needs the first
        s.send("My name is Zorblax.")
        s.wait("TTFT")
        s.prompt()
        s.send("What is my name?")
        second = s.wait("TTFT")
        reply = second.split("What is my name?", 1)[1]
        assert "Zorblax" in reply
        assert re.search(r"prompt \d+ tok [\d.]+ tok/s · decode \d+ tok [\d.]+ tok/s", second)
        status = s.prompt()
        assert "disk" in status and "RSS" in status and "ctx" in status

        # bad commands and values: one line, and the chat goes on
        for cmd, msg in (("/temp abc", "error: /temp expects a number"), ("/load missing.json", "error: missing.json: no such file"),
                         ("/frobnicate", "error: unknown command")):
            s.send(cmd)
            out = s.prompt()
            lines = [l for l in out.rsplit("\n> ", 1)[0].splitlines() if l.strip()]
            assert msg in out and len(lines) == 2, out  # the echo and one line of error

        # Ctrl-C at the prompt clears the line
        child.send("half a line")
        time.sleep(0.3)
        child.sendintr()
        assert "half a line^C" in s.prompt()
        s.send("/system")
        out = s.prompt()
        assert "no system prompt" in out and "half a line" not in out

        # /system, then a reply that follows it
        s.send("/system You are a pirate. Always answer like a pirate.")
        assert "system prompt set" in s.prompt()
        s.send("Who are you?")
        reply = s.wait("TTFT").split("Who are you?", 1)[1]
        assert re.search(r"pirate|captain|aye|matey|arr", reply, re.I), reply  # without it: "I'm SmolLM..."
        s.prompt()

        # /stats
        s.send("/stats")
        out = s.prompt()
        for word in ("decode", "tok/s", "KV cache", "page cache", "RSS", "temp 0"):
            assert word in out, out

        # Ctrl-C in the middle of a long answer, then another question
        s.send("/max-tokens 300")
        s.prompt()
        s.send("Write a long essay about the history of Rome.")
        s.wait("Rome.\n")
        s.wait_output()  # the reply has started
        child.sendintr()
        out = s.wait("[stopped")
        s.prompt()
        s.send("/max-tokens 10")
        s.prompt()
        s.send("What is my name?")
        reply = s.wait("TTFT").split("What is my name?", 1)[1]
        assert reply.strip()
        s.prompt()

        # /save and /load
        s.send("/save conv.json")
        assert "saved" in s.prompt()
        saved = json.loads((tmp_path / "conv.json").read_text(encoding="utf-8"))["messages"]
        assert saved[0] == {"role": "system", "content": "You are a pirate. Always answer like a pirate."}
        assert [m["role"] for m in saved[1:]] == ["user", "assistant"] * 5
        assert saved[1]["content"] == "My name is Zorblax." and "Zorblax" in saved[4]["content"]
        assert saved[8].get("stopped") is True and saved[8]["content"]
        s.send("/reset")
        assert "conversation cleared" in s.prompt()
        s.send("/load conv.json")
        assert "loaded 11 messages (5 turns)" in s.prompt()
        s.send("/stats")
        assert "11 messages" in s.prompt()

        s.send("/quit")
        child.expect(__import__("pexpect").EOF, timeout=20)
        child.close()
        assert child.exitstatus == 0
        assert "Traceback" not in s.text
    finally:
        if child.isalive():
            child.terminate(force=True)
    print(f"terminal session: {time.monotonic() - t0:.1f} s")


def test_terminal_chat_moe_without_template_and_ctrl_d(tmp_path):
    cfg, sd = random_llama_state(seed=5, n_expert=4, n_expert_used=2)  # a tiny MoE, no chat template
    path = write_state_gguf(cfg, sd, tmp_path / "tiny.gguf", "llama")
    child = _spawn(["chat", "-m", str(path), "-n", "4", "-t", "1", "--no-warmup", "--history", ""], tmp_path)
    s = Screen(child)
    try:
        out = s.wait("/help for commands", timeout=60)
        assert "no chat template" in out and "plain" in out
        assert "4 per layer, 2 routed per token" in out
        s.prompt()
        s.send('"""first line')
        s.send('second line"""')
        out = s.wait("TTFT")
        assert "experts in cache" in s.prompt()
        s.send("/experts 5")
        assert "error: /experts expects an integer 1..4, got '5'" in s.prompt()
        s.send("/experts 1")
        assert "1 of 4 experts per token" in s.prompt()
        s.send("/stats")
        out = s.prompt()
        assert "experts 1/4" in out and "per token" in out
        s.send("/save c.json")
        s.prompt()
        msgs = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["messages"]
        assert msgs[0] == {"role": "user", "content": "first line\nsecond line"}
        child.sendeof()
        child.expect(__import__("pexpect").EOF, timeout=20)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)
