"""Backend selection for the ops: which implementation serves an (op, device, dtype), and why the others do not.

Each backend declares the devices and dtypes it supports; a call may add its own rejections (an input that needs a
gradient only the reference provides, say). "auto" takes the first that fits: triton on CUDA, cpp on CPU, then the
reference. FASTGRPO_BACKEND in the environment replaces "auto" (for tests and benchmarks).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass

import torch

BACKENDS = ("triton", "cpp", "reference")
OPS = ("ddim_logprob", "ddim_step", "flow_sde_logprob", "flow_sde_step", "group_advantages", "grpo_loss",
       "matching_loss", "nft_loss")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """No backend (or not the requested one) can serve this call; the message lists each candidate and why."""


@functools.lru_cache(maxsize=None)
def triton_kernels():
    """(module, None) with the Triton kernels, or (None, reason) when they cannot load."""
    try:
        importlib.import_module("triton")
    except Exception as error:  # noqa: BLE001 - any import failure means the backend is absent
        return None, f"triton is not importable ({type(error).__name__})"
    try:
        return importlib.import_module("fastgrpo_kernels"), None
    except Exception as error:  # noqa: BLE001
        return None, f"fastgrpo_kernels is not importable ({type(error).__name__}: {error})"


@functools.lru_cache(maxsize=None)
def cpp_kernels():
    """(module, None) with the C++ CPU extension, or (None, reason) when it is not built."""
    try:
        return importlib.import_module("fastgrpo._C"), None
    except ImportError as error:
        return None, f"the C++ extension fastgrpo._C is not built ({error}); see README"


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES

    def rejection(self, device: torch.device, dtype: torch.dtype, auto: bool) -> str | None:
        """None when this backend can serve the device and dtype, else the reason it cannot."""
        if self.name == "triton":
            module, reason = triton_kernels()
            if module is None:
                return reason
            if device.type == "cpu":
                if auto:
                    return "auto picks Triton for CUDA tensors only (request backend='triton' for the interpreter)"
                if os.environ.get("TRITON_INTERPRET") != "1":
                    return "CPU tensors need TRITON_INTERPRET=1, set before triton is imported"
            elif device.type != "cuda":
                return f"device {device.type} not supported (supports cuda, and cpu under TRITON_INTERPRET=1)"
        elif self.name == "cpp":
            if device.type not in self.devices:
                return f"device {device.type} not supported (supports cpu)"
            module, reason = cpp_kernels()
            if module is None:
                return reason
        elif device.type not in self.devices:
            return f"device {device.type} not supported"
        if dtype not in self.dtypes:
            return f"dtype {dtype} not supported"
        return None


REGISTRY = {
    "triton": Backend("triton", devices=("cuda", "cpu")),
    "cpp": Backend("cpp", devices=("cpu",)),
    "reference": Backend("reference", devices=("cpu", "cuda", "mps", "xpu", "meta")),
}


def _requested(backend: str) -> str:
    if backend == "auto":
        backend = os.environ.get("FASTGRPO_BACKEND", "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def explain(op: str, device: torch.device | str, dtype: torch.dtype = torch.float32, backend: str = "auto",
            call_rejections: dict[str, str] | None = None) -> tuple[str | None, dict[str, str]]:
    """(chosen backend or None, {backend: reason rejected}) for a call of `op` on `device` with `dtype`.

    call_rejections: per-call reasons that rule out a backend (e.g. {'triton': 'group ids are not supported'}).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    device = torch.device(device)
    requested = _requested(backend)
    candidates = BACKENDS if requested == "auto" else (requested,)
    rejected: dict[str, str] = {}
    for name in candidates:
        reason = (call_rejections or {}).get(name) or REGISTRY[name].rejection(device, dtype, requested == "auto")
        if reason is None:
            return name, rejected
        rejected[name] = reason
    return None, rejected


_NOTICE_GIVEN = False


def _notice_reference_fallback(rejected: dict[str, str]) -> None:
    global _NOTICE_GIVEN
    if not _NOTICE_GIVEN and "cpp" in rejected and rejected["cpp"].startswith("the C++ extension"):
        _NOTICE_GIVEN = True
        print("fastgrpo: C++ CPU kernels not built; CPU ops use the PyTorch reference", file=sys.stderr)


def select_backend(op: str, tensor: torch.Tensor, backend: str,
                   call_rejections: dict[str, str] | None = None) -> str:
    """The backend that serves `op` for `tensor`, or BackendUnavailableError listing each rejection."""
    if backend == "auto":
        backend = os.environ.get("FASTGRPO_BACKEND") or "auto"
    # TRITON_INTERPRET decides only whether Triton may take CPU tensors, which happens only when asked for by name
    interpret_env = os.environ.get("TRITON_INTERPRET", "") if backend == "triton" else ""
    rejections = tuple(sorted(call_rejections.items())) if call_rejections else ()
    return _select(op, tensor.device.type, tensor.dtype, backend, rejections, interpret_env)


@torch.compiler.assume_constant_result
def _select(op: str, device_type: str, dtype: torch.dtype, backend: str,
            call_rejections: tuple[tuple[str, str], ...], interpret_env: str) -> str:
    # Plain arguments and a constant result: torch.compile evaluates this once at trace time (no graph break).
    return _select_cached(op, device_type, dtype, backend, call_rejections, interpret_env)


@functools.lru_cache(maxsize=1024)
def _select_cached(op: str, device_type: str, dtype: torch.dtype, backend: str,
                   call_rejections: tuple[tuple[str, str], ...], interpret_env: str) -> str:
    # Eager calls hit the cache; the environment variables that decide the choice are part of the key (backend
    # already holds FASTGRPO_BACKEND's choice).
    chosen, rejected = explain(op, device_type, dtype, backend, dict(call_rejections))
    if chosen is None:
        reasons = "; ".join(f"{name}: {why}" for name, why in rejected.items())
        raise BackendUnavailableError(f"{op}: no backend for device={device_type} dtype={dtype} "
                                      f"(backend={backend!r}). Rejected: {reasons}")
    if chosen == "reference":
        _notice_reference_fallback(rejected)
    return chosen
