"""Shared test set-up.

The CUDA kernel checks (tests/cuda_checks.py: a child process, some minutes under numba's CUDA
simulator on one core) start as soon as collection has selected them, so that they run beside
the rest of the suite instead of after it; tests/test_kernels_cuda.py reads their result."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
_CUDA_CHECKS = pytest.StashKey[dict]()
CUDA_CHECKS_TIMEOUT = 900  # seconds from the child's start
ON_GPU = os.environ.get("FLASHMOE_GPU_TESTS") == "1"  # make test-gpu: a real GPU, larger shapes


def _start_cuda_checks() -> dict:
    env = dict(os.environ)
    if not ON_GPU:
        env["NUMBA_ENABLE_CUDASIM"] = "1"  # (before numba.cuda is imported: hence a child process)
    args = [sys.executable, str(HERE / "cuda_checks.py")] + (["--big"] if ON_GPU else [])
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # (no pipe to fill)
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=err, text=True)
    return {"proc": proc, "out": out, "err": err, "t0": time.monotonic()}


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    if any(item.path.name == "test_kernels_cuda.py" for item in session.items):
        session.config.stash[_CUDA_CHECKS] = _start_cuda_checks()


def pytest_sessionfinish(session):
    run = session.config.stash.get(_CUDA_CHECKS, None)
    if run is not None:
        if run["proc"].poll() is None:  # (the session stopped before the checks were read)
            run["proc"].kill()
            run["proc"].wait()
        run["out"].close()
        run["err"].close()


def cuda_checks(config) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of tests/cuda_checks.py, started at collection (or now)."""
    run = config.stash.get(_CUDA_CHECKS, None)
    if run is None:
        run = config.stash[_CUDA_CHECKS] = _start_cuda_checks()
    left = CUDA_CHECKS_TIMEOUT - (time.monotonic() - run["t0"])
    try:
        rc = run["proc"].wait(timeout=max(left, 1))
    except subprocess.TimeoutExpired:
        run["proc"].kill()
        run["proc"].wait()
        rc = -9
    run["out"].seek(0)
    run["err"].seek(0)
    return rc, run["out"].read(), run["err"].read()
