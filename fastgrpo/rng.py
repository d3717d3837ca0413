"""Deterministic random streams: every random draw of a run comes from a generator keyed by (seed, epoch, purpose).

Keying by epoch (instead of threading one global RNG through the run) makes a resumed run draw exactly what an
uninterrupted one draws, and keeps prompt order independent of how the work is split.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from the run seed and any keys (stable across processes and Python versions)."""
    text = "/".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *keys, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded from (seed, *keys)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
