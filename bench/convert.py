"""Converter benchmark: peak memory and speed on a synthetic multi-GB checkpoint.

Writes a random Mixtral-style Hugging Face checkpoint (bf16 safetensors shards with an index,
config.json, a small trained tokenizer) into a temporary folder, converts it with
``flashmoe convert`` in a fresh process, and reports wall time, MB/s of source bytes and the
peak RSS of the converting process. The goal: peak RSS <= 1.5 GB + the largest stacked tensor,
and >= 100 MB/s of source on 2 cores.

    .venv/bin/python bench/convert.py                       # ~3 GB checkpoint, q4_k experts, q8_0 rest
    .venv/bin/python bench/convert.py --gb 6 --experts q2_k --rest q8_0 --cold
    .venv/bin/python bench/convert.py --llama-cpp PATH/TO/llama.cpp   # also llama.cpp's convert + quantize

``--cold`` evicts the shards from the page cache before converting (posix_fadvise DONTNEED).
With ``--llama-cpp`` (a llama.cpp source tree, e.g. the one inside llama-cpp-python's source
distribution, and the llama_cpp package) the same checkpoint goes through llama.cpp's pipeline:
convert_hf_to_gguf.py to bf16, then llama_model_quantize to Q4_K_M, each step timed the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _bf16_pool(n: int, seed: int = 0) -> np.ndarray:
    x = (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], pool: np.ndarray, rng) -> int:
    header, off = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            left = int(np.prod(shape))
            while left:
                k = min(left, len(pool) // 2)
                start = int(rng.integers(0, len(pool) - k + 1))
                f.write(pool[start : start + k].tobytes())
                left -= k
    return off


def make_checkpoint(folder: Path, target_gb: float, hidden: int = 1024, ff: int = 1024, n_expert: int = 16,
                    vocab: int = 32000, shard_gb: float = 1.0) -> dict:
    """A random Mixtral-style checkpoint of about target_gb GB; returns its numbers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    heads, kv_heads = hidden // 64, max(1, hidden // 256)
    per_layer = 2 * (n_expert * 3 * hidden * ff + 2 * hidden * hidden + 2 * hidden * kv_heads * 64 + n_expert * hidden)
    fixed = 2 * 2 * vocab * hidden
    n_layer = max(1, int((target_gb * 1e9 - fixed) // per_layer))
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(n_layer):
        p = f"model.layers.{i}"
        names += [(f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,)),
                  (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
                  (f"{p}.self_attn.k_proj.weight", (kv_heads * 64, hidden)),
                  (f"{p}.self_attn.v_proj.weight", (kv_heads * 64, hidden)),
                  (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
                  (f"{p}.block_sparse_moe.gate.weight", (n_expert, hidden))]
        for e in range(n_expert):
            q = f"{p}.block_sparse_moe.experts.{e}"
            names += [(f"{q}.w1.weight", (ff, hidden)), (f"{q}.w2.weight", (hidden, ff)), (f"{q}.w3.weight", (ff, hidden))]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    shards: list[list] = [[]]
    size = 0
    for n in names:
        nb = int(np.prod(n[1])) * 2
        if shards[-1] and size + nb > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    pool, rng = _bf16_pool(1 << 24), np.random.default_rng(1)
    weight_map, total = {}, 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(folder / fname, group, pool, rng)
        weight_map.update({name: fname for name, _ in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": ff, "num_hidden_layers": n_layer, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": 64, "num_local_experts": n_expert, "num_experts_per_tok": 2,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a synthetic checkpoint for the converter benchmark"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    largest_stacked = n_expert * ff * hidden * 4  # float32 bytes of one whole expert tensor
    return {"bytes": total, "layers": n_layer, "shards": len(shards), "largest_stacked_f32": largest_stacked}


def evict(folder: Path) -> None:
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run cmd in a child process: (wall seconds, peak RSS of that child in GiB, from wait4)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"command failed: {' '.join(cmd)}\n{err.read().decode(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=3.0, help="checkpoint size in GB (default 3)")
    ap.add_argument("--experts", default="q4_k")
    ap.add_argument("--rest", default="q8_0")
    ap.add_argument("--cold", action="store_true", help="evict the shards from the page cache first")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary folder on the output disk)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--llama-cpp", default=None, metavar="DIR", help="llama.cpp source tree: also time its pipeline")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=a.dir or (ROOT / "models")))
    try:
        t0 = time.perf_counter()
        info = make_checkpoint(work / "hf", a.gb)
        print(f"checkpoint: {info['bytes'] / 1e9:.2f} GB in {info['shards']} shards, {info['layers']} layers "
              f"(made in {time.perf_counter() - t0:.0f} s); largest stacked tensor as float32: "
              f"{info['largest_stacked_f32'] / 2**30:.2f} GiB")
        if a.cold:
            evict(work / "hf")
        flashmoe = str(Path(sys.executable).with_name("flashmoe"))
        wall, rss = timed([flashmoe, "convert", str(work / "hf"), "-o", str(work / "out.gguf"), "-q",
                           "--experts", a.experts, "--rest", a.rest])
        out_gb = (work / "out.gguf").stat().st_size / 1e9
        goal = 1.5 + info["largest_stacked_f32"] / 2**30
        print(f"flashmoe convert ({a.experts} experts, {a.rest} rest{', cold' if a.cold else ''}): "
              f"{wall:.1f} s, {info['bytes'] / 1e6 / wall:.0f} MB/s of source, peak RSS {rss:.2f} GiB "
              f"(goal <= {goal:.2f} GiB), output {out_gb:.2f} GB")
        if a.llama_cpp:
            lc = Path(a.llama_cpp)
            (work / "out.gguf").unlink()
            if a.cold:
                evict(work / "hf")
            # the synthetic tokenizer is not in llama.cpp's pre-tokenizer table: name it "gpt-2" (as ours does)
            wrapper = ("import runpy, sys\n"
                       f"sys.path[:0] = [{str(lc)!r}, {str(lc / 'gguf-py')!r}]\n"
                       "import conversion.base as b\n"
                       "b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2'\n"
                       f"sys.argv = [{str(lc / 'convert_hf_to_gguf.py')!r}] + sys.argv[1:]\n"
                       f"runpy.run_path({str(lc / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n")
            w1, r1 = timed([sys.executable, "-c", wrapper, str(work / "hf"), "--outfile",
                            str(work / "lc-bf16.gguf"), "--outtype", "bf16"])
            print(f"llama.cpp convert_hf_to_gguf.py -> bf16: {w1:.1f} s, peak RSS {r1:.2f} GiB")
            script = ("import llama_cpp, sys\n"
                      "p = llama_cpp.llama_model_quantize_default_params()\n"
                      "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M\n"
                      "p.nthread = 2\n"
                      "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n")
            w2, r2 = timed([sys.executable, "-c", script, str(work / "lc-bf16.gguf"), str(work / "lc-q4km.gguf")])
            print(f"llama.cpp quantize bf16 -> Q4_K_M: {w2:.1f} s, peak RSS {r2:.2f} GiB; together "
                  f"{w1 + w2:.1f} s = {info['bytes'] / 1e6 / (w1 + w2):.0f} MB/s of source")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
