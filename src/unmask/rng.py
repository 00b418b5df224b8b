"""Counter-based random numbers for samplers.

A uniform is a pure function of integers: ``uniform(seed, counter, index)`` hashes them with the
splitmix64 finalizer (Steele, Lea and Flood 2014) in int64 tensor arithmetic, so it runs vectorized
on any device and never depends on how many other numbers were drawn. A sampler keys each draw by
the row's own seed, the row's own step counter and the position, so a row's sample is the same
whatever else is in the batch and whatever the batch size (batch invariance), and a run replays
exactly from its seeds.

Arithmetic wraps modulo 2^64 in two's complement (as PyTorch's int64 ops do on CPU and CUDA);
logical right shifts are spelled as arithmetic shifts followed by a mask. On the CPU the same arithmetic
runs in NumPy's uint64 (wrapping, logical shifts, a third of the time per small array: a sampler hashes a
few dozen keys per step, where each tensor operation's overhead dominates); both give the same bits. A
pure-Python reference (:func:`reference_uniform`) checks the tensor version.
"""

from __future__ import annotations

import numpy as np
import torch

_U64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN = _signed(0x9E3779B97F4A7C15)
MUL1 = _signed(0xBF58476D1CE4E5B9)
MUL2 = _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values seen as unsigned."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * MUL1
    z = (z ^ _shr(z, 27)) * MUL2
    return z ^ _shr(z, 31)


_NP_GOLDEN, _NP_MUL1, _NP_MUL2 = (np.uint64(c & _U64) for c in (GOLDEN, MUL1, MUL2))
_NP_SHIFTS = {k: np.uint64(k) for k in (11, 27, 30, 31, 40)}


def _mix_np(z: np.ndarray) -> np.ndarray:
    """:func:`_mix` on uint64 arrays (NumPy's uint64 wraps and shifts logically: the same bits)."""
    z = (z ^ (z >> _NP_SHIFTS[30])) * _NP_MUL1
    z = (z ^ (z >> _NP_SHIFTS[27])) * _NP_MUL2
    return z ^ (z >> _NP_SHIFTS[31])


def _on_cpu(*values) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor) and not v.is_cpu:
            return False
    return True


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU integer tensor's values as a uint64 array (its two's complement bits)."""
    return (t if t.dtype == torch.int64 else t.to(torch.int64)).numpy().view(np.uint64)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint64).view(np.int64))


def _uniform_np(a: np.ndarray) -> torch.Tensor:
    """:func:`to_uniform` of a uint64 array."""
    return torch.from_numpy(np.asarray((a >> _NP_SHIFTS[11]).astype(np.float64) * 2.0 ** -53))


def _absorb_np(a: np.ndarray | None, parts) -> np.ndarray:
    """:func:`absorb` in uint64 arrays; a Python integer part is mixed in Python and joins the constant."""
    with np.errstate(over="ignore"):  # uint64 wraps modulo 2^64 on purpose
        for part in parts:
            if isinstance(part, torch.Tensor):
                p = _mix_np(_np(part) + _NP_GOLDEN)
                a = p if a is None else _mix_np(a + _NP_GOLDEN + p)
            else:
                p = (_mixed_int(part) + (0 if a is None else GOLDEN)) & _U64
                a = np.asarray(p, dtype=np.uint64) if a is None else _mix_np(a + np.uint64(p))
    return a


def _mixed_int(p: int) -> int:
    """``_mix(p + GOLDEN)`` of a Python integer, as int64 (the tensor arithmetic's value, computed exactly)."""
    return _signed(_mix_py((p + 0x9E3779B97F4A7C15) & _U64))


def hash64(*parts: torch.Tensor | int) -> torch.Tensor:
    """A 64-bit hash (as int64) of integer tensors/ints, broadcast together."""
    return absorb(None, *parts)


def absorb(z: torch.Tensor | None, *parts: torch.Tensor | int) -> torch.Tensor:
    """The hash of :func:`hash64` continued from ``z``, the hash of the parts before (None: none): so
    ``absorb(hash64(a), b, c) == hash64(a, b, c)``, and a caller that hashes many keys with one first part
    mixes it once. A Python integer part is mixed in Python (exactly the tensor arithmetic's value, fewer
    small tensor operations)."""
    if _on_cpu(z, *parts):
        return _tensor(_absorb_np(None if z is None else _np(z), parts))
    for part in parts:
        if torch.is_tensor(part):
            p = _mix(part.to(device=part.device if z is None else z.device, dtype=torch.int64) + GOLDEN)
        else:
            p = _mixed_int(part)
        if z is None:
            z = p if torch.is_tensor(p) else torch.tensor(p, dtype=torch.int64)
        else:
            z = _mix(z + GOLDEN + p)
    return z


def stream(base: torch.Tensor, j: torch.Tensor | int) -> torch.Tensor:
    """The ``j``-th output (from 0) of a splitmix64 generator whose state starts at ``base``: one
    mixing round per value, for many numbers from one hashed key."""
    j = j if torch.is_tensor(j) else torch.tensor(j, dtype=torch.int64)
    if _on_cpu(base, j):
        with np.errstate(over="ignore"):
            return _tensor(_mix_np(_np(base) + (_np(j) + np.uint64(1)) * _NP_GOLDEN))
    return _mix(base + (j.to(torch.int64) + 1) * GOLDEN)


def to_uniform(z: torch.Tensor) -> torch.Tensor:
    """float64 on [0, 1) from the top 53 bits of a 64-bit hash."""
    if _on_cpu(z):
        return _uniform_np(_np(z))
    return _shr(z, 11).to(torch.float64) * 2.0 ** -53


def to_uniform32(z: torch.Tensor) -> torch.Tensor:
    """float32 on the 2^-24 grid of [0, 1) (like ``torch.rand(dtype=float32)``) from a 64-bit hash."""
    if _on_cpu(z):
        return torch.from_numpy((_np(z) >> _NP_SHIFTS[40]).astype(np.float32) * np.float32(2.0 ** -24))
    return _shr(z, 40).to(torch.float32) * 2.0 ** -24


def uniform(*parts: torch.Tensor | int) -> torch.Tensor:
    """float64 uniforms on [0, 1) with 53 random bits, one per broadcast element of ``parts``."""
    return uniform_after(None, *parts)


def uniform_after(z: torch.Tensor | None, *parts: torch.Tensor | int) -> torch.Tensor:
    """``to_uniform(absorb(z, *parts))`` (on the CPU without the hash's tensor in between)."""
    if _on_cpu(z, *parts):
        return _uniform_np(_absorb_np(None if z is None else _np(z), parts))
    return to_uniform(absorb(z, *parts))


def _mix_py(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def reference_uniform(*parts: int) -> float:
    """Pure-Python (arbitrary precision, explicit mod 2^64) version of :func:`uniform`."""
    z = None
    for p in parts:
        p &= _U64
        if z is None:
            z = _mix_py((p + 0x9E3779B97F4A7C15) & _U64)
        else:
            z = _mix_py((z + 0x9E3779B97F4A7C15 + _mix_py((p + 0x9E3779B97F4A7C15) & _U64)) & _U64)
    return (z >> 11) * 2.0 ** -53
