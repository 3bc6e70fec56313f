"""bfloat16 helpers for NumPy, which has no bf16 type: bf16 values travel as uint16 bit
patterns (open the session with dtype="bfloat16" and pass uint16 arrays)."""
import numpy as np


def float32_to_bf16(x):
    """float array -> uint16 bf16 bit patterns (round to nearest even; NaN stays NaN)."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def bf16_to_float32(b):
    """uint16 bf16 bit patterns -> float32 array."""
    b = np.ascontiguousarray(b, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)
