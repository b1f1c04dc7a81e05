"""Chat template rendering: SmolLM2's ChatML template and the helpers HF templates rely on."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from flashmoe_gguf.chat_template import ChatTemplateError, fallback_prompt, render

DATA = Path(__file__).parent / "data" / "smollm2"
MODEL = Path(__file__).parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = (DATA / "chat_template.jinja").read_text()
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_copy_of_template_matches_the_model_file():
    if not MODEL.exists():
        pytest.skip(f"{MODEL.name} absent (run `make models`)")
    from gguf import GGUFReader

    assert GGUFReader(MODEL).fields["tokenizer.chat_template"].contents() == SMOLLM2


def test_smollm2_conversation():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "2+2?\nAnswer in digits."},
    ]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                "<|im_start|>user\n2+2?\nAnswer in digits.<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render(SMOLLM2, messages) == expected
    assert render(SMOLLM2, messages, add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]


def test_smollm2_inserts_its_default_system_prompt():
    out = render(SMOLLM2, [{"role": "user", "content": "héllo 日本 😀"}])
    assert out == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                   "<|im_start|>user\nhéllo 日本 😀<|im_end|>\n<|im_start|>assistant\n")


def test_bos_eos_and_extra_variables_reach_the_template():
    t = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}{{ flavour }}"
    assert render(t, [{"role": "user", "content": "a"}], bos_token="<s>", eos_token="</s>", flavour="!") == "<s>a</s>!"


def test_trim_and_lstrip_blocks_as_hf():
    t = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}"
    # trim_blocks eats the newline after a block tag, lstrip_blocks the indentation before one
    assert render(t, [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]) == "U:x\nU:y\n"


def test_tojson_keeps_non_ascii_and_takes_options():
    t = "{{ tools | tojson }}|{{ tools | tojson(indent=2) }}"
    tools = [{"name": "météo", "args": {"b": 1, "a": "東京"}}]
    out = render(t, [], tools=tools)
    compact, indented = out.split("|")
    assert compact == json.dumps(tools, ensure_ascii=False)
    assert indented == json.dumps(tools, ensure_ascii=False, indent=2)
    assert "\\u" not in out


def test_strftime_now_and_loop_controls():
    t = "{{ strftime_now('%Y') }}:{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    out = render(t, [{"content": c} for c in "abcd"])
    assert out in (f"{datetime.now().year}:ab", f"{datetime.now().year + 1}:ab")


def test_generation_block_renders_its_body():
    t = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    assert render(t, [{"content": "a"}, {"content": "b"}]) == "[a][b]"


def test_raise_exception_becomes_chat_template_error():
    t = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    assert render(t, [{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(ChatTemplateError, match="Conversation must start with user"):
        render(t, [{"role": "assistant", "content": ""}])


def test_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match="line 2"):
        render("ok\n{% for m in messages %}{{ m }", [])


def test_runtime_errors_and_sandbox():
    with pytest.raises(ChatTemplateError):
        render("{{ messages[0].content + 1 }}", [{"content": "a"}])
    with pytest.raises(ChatTemplateError):   # the sandbox refuses internals
        render("{{ messages.__class__.__subclasses__() }}", [])
    with pytest.raises(ChatTemplateError):   # and mutation (immutable sandbox, as HF)
        render("{% set x = messages.append(1) %}", [])


def test_fallback_prompt():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]
    assert fallback_prompt(msgs) == "system: Be brief.\nuser: Hi\nthere\nassistant: Hello\nassistant:"
    assert fallback_prompt(msgs[:2], add_generation_prompt=False) == "system: Be brief.\nuser: Hi\nthere"
