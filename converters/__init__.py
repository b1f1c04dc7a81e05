"""Converters: Hugging Face checkpoints and GGUF files -> GGUF (``flashmoe convert``).

    from flashmoe_gguf.converters import convert
    convert("path/to/hf-folder", "out.gguf", experts="q4_k", rest="q8_0")
    convert("model.Q8_0.gguf", "model.Q2_K-experts.gguf", experts="q2_k")          # re-quantize
    convert("dense.gguf", "moe.gguf", experts="q4_k", upcycle=(32, 4, 0))          # upcycle

Modules: ``convert`` (the pipeline), ``hf`` / ``gguf_source`` (sources), ``safetensors_io`` (lazy
shards), ``vocab`` (tokenizer metadata), ``plan`` (quantization policy), ``parts`` (row sources),
``codec`` (float/quantized encoding), ``upcycle``, ``writer`` (streaming, atomic), ``progress``,
``cli`` (the ``convert`` subcommand).
"""
from .convert import convert

__all__ = ["convert"]
