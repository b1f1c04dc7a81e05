"""What every source (a Hugging Face folder, a GGUF file) hands to the converter."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFValueType, GGUFWriter
from gguf.gguf_writer import GGUFValue

from .plan import TensorPlan


def recorder(arch: str) -> GGUFWriter:
    """A GGUFWriter without a file, used to collect metadata with gguf's typed ``add_*`` helpers."""
    return GGUFWriter(None, arch)


@dataclass
class Source:
    path: str
    arch: str  # GGUF general.architecture
    meta: dict[str, GGUFValue]  # ordered metadata, general.architecture included
    plan: list[TensorPlan]
    # dense-model sizes that upcycling needs
    n_layer: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    n_embd: int = 0
    n_ff: int = 0
    kind: str = "hf"  # "hf" | "gguf"
    info: dict[str, Any] = field(default_factory=dict)

    def set(self, key: str, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> None:
        self.meta[key] = GGUFValue(value, vtype, sub_type)

    def rename_arch(self, new: str) -> None:
        """Move ``{old}.*`` keys to ``{new}.*`` (same positions) and set general.architecture."""
        old = self.arch
        self.meta = {(f"{new}.{k[len(old) + 1:]}" if k.startswith(old + ".") else k): v for k, v in self.meta.items()}
        self.set("general.architecture", new, GGUFValueType.STRING)
        self.arch = new
