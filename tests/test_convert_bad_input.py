"""Bad converter input: one clear error line, non-zero exit, and no output (not even a partial one)."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from flashmoe_gguf.cli import main  # noqa: E402
from test_convert_util import make_hf_model, read_config, write_config  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    make_hf_model(folder, "llama")
    return folder


@pytest.fixture
def copy(good, tmp_path):
    import shutil

    dst = tmp_path / "src"
    shutil.copytree(good, dst)
    return dst


def _convert(capsys, src, out, *extra) -> tuple[int, str]:
    code = main(["convert", str(src), "-o", str(out), "-q", *extra])
    return code, capsys.readouterr().err


def _assert_failed(code: int, err: str, out: Path, *needles: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("flashmoe: error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_good_folder_converts(good, tmp_path, capsys):
    code, err = _convert(capsys, good, tmp_path / "ok.gguf")
    assert code == 0, err
    assert (tmp_path / "ok.gguf").stat().st_size > 0


def test_missing_source(tmp_path, capsys):
    out = tmp_path / "o.gguf"
    _assert_failed(*_convert(capsys, tmp_path / "nope", out), out, "no such file")


def test_missing_config(copy, tmp_path, capsys):
    (copy / "config.json").unlink()
    out = tmp_path / "o.gguf"
    _assert_failed(*_convert(capsys, copy, out), out, "config.json is missing")


def test_unknown_architecture(copy, tmp_path, capsys):
    cfg = read_config(copy)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    write_config(copy, cfg)
    out = tmp_path / "o.gguf"
    _assert_failed(*_convert(capsys, copy, out), out, "unsupported architecture 'GPT2LMHeadModel'")


def test_shape_mismatch(copy, tmp_path, capsys):
    cfg = read_config(copy)
    cfg["intermediate_size"] = 128
    write_config(copy, cfg)
    out = tmp_path / "o.gguf"
    _assert_failed(*_convert(capsys, copy, out), out, "mlp.", "config.json implies")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_truncated_shard(copy, tmp_path, capsys, keep):
    shard = copy / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "o.gguf"
    code, err = _convert(capsys, copy, out)
    _assert_failed(code, err, out, "model.safetensors")
    assert "truncated" in err or "not a safetensors file" in err


def test_corrupt_header(copy, tmp_path, capsys):
    shard = copy / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    shard.write_bytes(bytes(data))
    out = tmp_path / "o.gguf"
    _assert_failed(*_convert(capsys, copy, out), out, "corrupt safetensors header")


def test_missing_shard_of_index(copy, tmp_path, capsys):
    import json

    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(copy / "model-00001-of-00002.safetensors", "np") as f:
        names = list(f.keys())
    wm = {n: "model-00001-of-00002.safetensors" for n in names}
    wm[names[0]] = "model-00002-of-00002.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    out = tmp_path / "o.gguf"
    _assert_failed(*_convert(capsys, copy, out), out, "model-00002-of-00002.safetensors", "missing")


def test_bad_type(good, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    _assert_failed(*_convert(capsys, good, out, "--rest", "q9_9"), out, "unknown tensor type 'q9_9'")
    _assert_failed(*_convert(capsys, good, out, "--type", "(=q8_0"), out, "bad regular expression")


def test_not_enough_disk_space(good, tmp_path, capsys, monkeypatch):
    import shutil as sh

    from flashmoe_gguf.converters import writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "o.gguf"
    _assert_failed(*_convert(capsys, good, out), out, "not enough disk space")


def test_disk_full_while_writing(good, tmp_path, capsys, monkeypatch):
    from flashmoe_gguf.converters import writer

    real = writer._write_tensor
    calls = []

    def failing(fout, t, *a):
        calls.append(t.name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fout, t, *a)

    monkeypatch.setattr(writer, "_write_tensor", failing)
    out = tmp_path / "o.gguf"
    out.write_bytes(b"old")  # an existing output survives a failed conversion untouched
    code, err = _convert(capsys, good, out)
    assert code == 1 and "disk full" in err and err.count("\n") == 1
    assert out.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_interrupt_leaves_nothing(good, tmp_path, capsys, monkeypatch):
    from flashmoe_gguf.converters import writer

    real = writer._write_tensor

    def interrupted(fout, t, *a):
        if t.name.startswith("blk.1"):
            raise KeyboardInterrupt
        return real(fout, t, *a)

    monkeypatch.setattr(writer, "_write_tensor", interrupted)
    out = tmp_path / "o.gguf"
    assert main(["convert", str(good), "-o", str(out), "-q"]) == 130
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_output_is_a_directory(good, tmp_path, capsys):
    code, err = _convert(capsys, good, tmp_path)
    assert code == 1 and "is a directory" in err
