"""Imported before numba.cuda: numba-cuda 0.30 still calls ``np.row_stack``, which numpy 2.5
removed (GPU images ship that pair). ``np.vstack`` is the same function."""
import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
