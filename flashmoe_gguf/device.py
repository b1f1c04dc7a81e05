"""Where the forward pass runs: ``cpu``, ``cuda`` (the whole model in GPU memory), ``hybrid``
(dense part and KV cache on the GPU, routed experts on the CPU from the page cache) or ``auto``
(cuda for dense models, hybrid for MoE models when a CUDA GPU is usable, else cpu).
"""
from __future__ import annotations

from .errors import FlashMoEError

DEVICES = ("cpu", "cuda", "hybrid", "auto")


def cuda_usable() -> bool:
    try:
        from numba import cuda
    except ImportError:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # a driver that fails to initialise
        return False


def place(net, device: str):
    """The network ``net`` (built for the CPU) moved to ``device``; ``net`` itself for cpu."""
    if device not in DEVICES:
        raise FlashMoEError(f"unknown device {device!r} (one of {', '.join(DEVICES)})")
    if device == "cpu":
        return net
    is_moe = net.cfg.is_moe
    if device == "auto":
        if not cuda_usable():
            return net
        device = "hybrid" if is_moe else "cuda"
    elif not cuda_usable():
        raise FlashMoEError(f"device {device}: no usable CUDA GPU (numba-cuda, the 'cuda' extra, and a driver)")
    from .arch.llama import LlamaModel

    if type(net) is not LlamaModel:
        raise FlashMoEError(f"device {device}: only the llama family runs on the GPU so far")
    from .arch.cuda_llama import CudaLlama

    return CudaLlama(net, hybrid=(device == "hybrid"))
