"""Malformed files and bad values: one clear error line naming the problem, non-zero exit, no crash."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe_gguf.cli import main
from tiny_gguf import random_llama_state, write_state_gguf


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    cfg, sd = random_llama_state()
    return write_state_gguf(cfg, sd, tmp_path_factory.mktemp("g") / "good.gguf", "llama")


def _variant(good: Path, tmp_path: Path, name: str, edit) -> Path:
    data = bytearray(good.read_bytes())
    data = edit(data)
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def _run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("flashmoe: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _tensor_type_offset(data: bytes, name: str) -> int:
    """Byte offset of the type field of tensor ``name`` in the header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return at + 4 + 8 * n_dims


def test_good_file_runs(good, capsys):
    code, err = _run_cli(capsys, ["run", "-m", str(good), "-p", "hello", "-n", "3", "--temp", "0"])
    assert code == 0, err


@pytest.mark.parametrize(
    "case, edit, needles",
    [
        ("bad_magic", lambda d: b"GGUX" + d[4:], ["bad magic"]),
        ("truncated_header", lambda d: d[:200], ["truncated"]),
        ("truncated_data", lambda d: d[: len(d) * 2 // 3], ["outside the file"]),
        ("tail_cut", lambda d: d[:-8], ["outside the file"]),
        ("empty", lambda d: b"", ["not a GGUF"]),
    ],
)
def test_corrupt_files(good, tmp_path, capsys, case, edit, needles):
    p = _variant(good, tmp_path, f"{case}.gguf", edit)
    for argv in (["info", str(p)], ["run", "-m", str(p), "-p", "hi", "-n", "1"]):
        code, err = _run_cli(capsys, argv)
        _assert_one_line_error(code, err, p.name, *needles)


def test_unknown_tensor_type(good, tmp_path, capsys):
    def edit(d):
        off = _tensor_type_offset(bytes(d), "blk.0.attn_q.weight")
        d[off : off + 4] = struct.pack("<I", 77)
        return d

    p = _variant(good, tmp_path, "badtype.gguf", edit)
    code, err = _run_cli(capsys, ["run", "-m", str(p), "-p", "hi", "-n", "1"])
    _assert_one_line_error(code, err, "blk.0.attn_q.weight", "unknown type")


def test_unsupported_kernel_type(good, tmp_path, capsys):
    """A valid GGML type with no kernel here (I32 as a weight) names the tensor and the type."""
    def edit(d):
        off = _tensor_type_offset(bytes(d), "blk.1.ffn_up.weight")
        d[off : off + 4] = struct.pack("<I", 26)  # GGML_TYPE_I32: same byte size as F32
        return d

    p = _variant(good, tmp_path, "i32.gguf", edit)
    code, err = _run_cli(capsys, ["run", "-m", str(p), "-p", "hi", "-n", "1"])
    _assert_one_line_error(code, err, "blk.1.ffn_up.weight", "I32")


@pytest.mark.parametrize("skip, needle", [
    (("tokenizer.ggml.tokens",), "tokenizer.ggml.tokens"),
    (("tokenizer.ggml.model",), "tokenizer.ggml.model"),
    (("llama.block_count",), "llama.block_count"),
])
def test_missing_metadata(tmp_path, capsys, skip, needle):
    cfg, sd = random_llama_state()
    p = write_state_gguf(cfg, sd, tmp_path / "nokey.gguf", "llama", skip_keys=skip)
    code, err = _run_cli(capsys, ["run", "-m", str(p), "-p", "hi", "-n", "1"])
    _assert_one_line_error(code, err, needle)


def test_unknown_architecture(tmp_path, capsys):
    cfg, sd = random_llama_state()
    p = write_state_gguf(cfg, sd, tmp_path / "arch.gguf", "llama")
    data = p.read_bytes().replace(b"llama", b"zzzzz")  # the architecture name and its keys
    p.write_bytes(data)
    code, err = _run_cli(capsys, ["run", "-m", str(p), "-p", "hi", "-n", "1"])
    _assert_one_line_error(code, err, "zzzzz")


def test_missing_file_and_bad_values(good, capsys):
    code, err = _run_cli(capsys, ["run", "-m", "no/such/model.gguf", "-p", "hi"])
    _assert_one_line_error(code, err, "no/such/model.gguf")
    code, err = _run_cli(capsys, ["info", str(good.parent)])
    _assert_one_line_error(code, err, "directory")


@pytest.mark.parametrize("argv", [
    ["--temp", "abc"], ["--temp", "-1"], ["--top-p", "0"], ["-n", "-5"], ["-c", "0"], ["--top-k", "x"],
])
def test_bad_cli_values_exit_2(good, argv):
    r = subprocess.run([sys.executable, "-m", "flashmoe_gguf.cli", "run", "-m", str(good), "-p", "hi", *argv],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "error:" in r.stderr.splitlines()[-1]


def test_context_overflow(good, capsys):
    code, err = _run_cli(capsys, ["run", "-m", str(good), "-c", "8", "-p", "a b c d e f g h i j k l", "-n", "1"])
    _assert_one_line_error(code, err, "context")


def test_process_exit_code(good, tmp_path):
    p = tmp_path / "trunc.gguf"
    p.write_bytes(good.read_bytes()[:300])
    r = subprocess.run([sys.executable, "-m", "flashmoe_gguf.cli", "info", str(p)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "trunc.gguf" in r.stderr
