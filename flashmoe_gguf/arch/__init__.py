"""Architectures by GGUF ``general.architecture`` name."""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import ModelError
from ..gguf_file import GGUFFile
from .deepseek2 import DeepSeek2Model
from .gpt_oss import GptOssModel
from .llama import LlamaModel
from .qwen35 import Qwen35Model

_ARCHS = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
    "qwen3": LlamaModel,
    "qwen2moe": LlamaModel,
    "qwen3moe": LlamaModel,
    "olmoe": LlamaModel,
    "qwen35": Qwen35Model,
    "qwen35moe": Qwen35Model,
    "deepseek2": DeepSeek2Model,
    "gpt-oss": GptOssModel,
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHS)


def build(gf: GGUFFile, cfg: ModelConfig, n_ctx: int, store=None):
    cls = _ARCHS.get(cfg.arch)
    if cls is None:
        raise ModelError(
            f"{gf.path}: unsupported architecture {cfg.arch!r} (supported: {', '.join(supported_architectures())})"
        )
    return cls(gf, cfg, n_ctx, store=store)
