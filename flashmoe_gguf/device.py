"""Where the forward pass runs.

``cpu``; ``cuda`` (the whole model in GPU memory); ``hybrid`` (dense part, shared experts and KV
cache on the GPU, routed experts from host memory: a GPU expert cache of ``gpu_expert_cache_gb``
fed through pinned staging buffers, or the CPU from the page cache); ``auto``: the best that fits
(cuda when the weights fit in free GPU memory, else hybrid for a MoE, else cpu).
``unified_memory`` (or a GPU that reports itself integrated): the expert kernels read the
mmapped file in place (mapped host memory), with no copy; everything else as ``cuda``.
"""
from __future__ import annotations

from .errors import FlashMoEError

DEVICES = ("cpu", "cuda", "hybrid", "auto")


def cuda_usable() -> bool:
    from . import cuda_compat  # noqa: F401  (before numba.cuda)
    try:
        from numba import cuda
    except ImportError:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # a driver that fails to initialise
        return False


def gpu_integrated() -> bool:
    from numba import cuda
    try:
        return bool(cuda.get_current_device().INTEGRATED)
    except Exception:
        return False


def gpu_free_bytes() -> int:
    from numba import cuda
    free, _ = cuda.current_context().get_memory_info()
    return int(min(free, 2 ** 62))  # (the simulator reports infinity)


def model_bytes(gf) -> int:
    return sum(t.n_bytes for t in gf)


def choose(device: str, gf, is_moe: bool, unified: bool = False) -> str:
    """The mode a device request resolves to: cpu, cuda, hybrid or unified."""
    if device not in DEVICES:
        raise FlashMoEError(f"unknown device {device!r} (one of {', '.join(DEVICES)})")
    if device == "cpu":
        if unified:
            raise FlashMoEError("--unified-memory needs a GPU device (cuda, hybrid or auto)")
        return "cpu"
    if not cuda_usable():
        if device == "auto":
            return "cpu"
        raise FlashMoEError(f"device {device}: no usable CUDA GPU (numba-cuda, the 'cuda' extra, and a driver)")
    if is_moe and (unified or gpu_integrated()):
        return "unified"
    if device == "auto":
        fits = gf is not None and model_bytes(gf) < 0.9 * gpu_free_bytes()
        return "cuda" if fits else ("hybrid" if is_moe else "cpu")
    return device


def place(net, device: str, gf=None, gpu_expert_cache_gb: float = 0.0, unified: bool = False):
    """The network ``net`` (built for the CPU) moved to ``device``; ``net`` itself for cpu."""
    if gpu_expert_cache_gb < 0:
        raise FlashMoEError(f"gpu_expert_cache_gb must be >= 0, got {gpu_expert_cache_gb}")
    mode = choose(device, gf, net.cfg.is_moe, unified)
    if mode == "cpu":
        return net
    from .arch.llama import LlamaModel

    if type(net) is not LlamaModel:
        raise FlashMoEError(f"device {device}: only the llama family (dense and MoE) runs on the GPU so far")
    if mode == "cuda" and gf is not None:
        need, free = model_bytes(gf), gpu_free_bytes()
        if need > free:
            raise FlashMoEError(f"device cuda: the model's {need / 1e9:.1f} GB do not fit in the GPU's "
                                f"{free / 1e9:.1f} GB free (use --device hybrid)")
    from .arch.cuda_llama import CudaLlama

    return CudaLlama(net, mode=mode, gpu_expert_cache_gb=gpu_expert_cache_gb, gf=gf)
