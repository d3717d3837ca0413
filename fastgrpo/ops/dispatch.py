"""Backend selection for the ops: which implementation serves an (op, device, dtype), and why the others do not.

Each backend declares the ops, devices and dtypes it supports. "auto" takes the first that fits in the order
triton (CUDA), cpp (CPU), reference. FASTGRPO_BACKEND in the environment replaces "auto" (for tests and benchmarks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

BACKENDS = ("triton", "cpp", "reference")
OPS = ("ddim_logprob", "ddim_step", "group_advantages", "grpo_loss")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """No backend (or not the requested one) can serve this call; the message lists each candidate and why."""


@dataclass(frozen=True)
class Backend:
    name: str
    ops: tuple[str, ...]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    unavailable_reason: str | None = None  # set when the backend cannot load at all

    def rejection(self, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when this backend can serve the call, else the reason it cannot."""
        if self.unavailable_reason:
            return self.unavailable_reason
        if op not in self.ops:
            return f"no {op} kernel is registered"
        if device.type not in self.devices:
            return f"device {device.type} not supported (supports {', '.join(self.devices)})"
        if dtype not in self.dtypes:
            return f"dtype {dtype} not supported"
        return None


@dataclass
class Registry:
    backends: dict[str, Backend] = field(default_factory=dict)

    def register(self, backend: Backend) -> None:
        self.backends[backend.name] = backend


REGISTRY = Registry()
REGISTRY.register(Backend("triton", ops=(), devices=("cuda",)))
REGISTRY.register(Backend("cpp", ops=(), devices=("cpu",)))
REGISTRY.register(Backend("reference", ops=OPS, devices=("cpu", "cuda", "mps", "xpu", "meta")))


def _requested(backend: str) -> str:
    if backend == "auto":
        backend = os.environ.get("FASTGRPO_BACKEND", "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def explain(op: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
            backend: str = "auto") -> tuple[str | None, dict[str, str]]:
    """(chosen backend or None, {backend: reason rejected}) for a call of `op` on `device` with `dtype`."""
    device = torch.device(device)
    requested = _requested(backend)
    candidates = BACKENDS if requested == "auto" else (requested,)
    rejected: dict[str, str] = {}
    for name in candidates:
        reason = REGISTRY.backends[name].rejection(op, device, dtype)
        if reason is None:
            return name, rejected
        rejected[name] = reason
    return None, rejected


def select_backend(op: str, tensor: torch.Tensor, backend: str) -> str:
    """The backend that serves `op` for `tensor`, or BackendUnavailableError listing each rejection."""
    chosen, rejected = explain(op, tensor.device, tensor.dtype, backend)
    if chosen is None:
        reasons = "; ".join(f"{name}: {why}" for name, why in rejected.items())
        raise BackendUnavailableError(f"{op}: no backend for device={tensor.device.type} dtype={tensor.dtype} "
                                      f"(backend={backend!r}). Rejected: {reasons}")
    return chosen
