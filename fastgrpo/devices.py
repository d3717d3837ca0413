"""Which device this process runs on.

Under a distributed launcher (`deepspeed`, `torchrun`) every process sees all of the machine's GPUs and is told its
place by LOCAL_RANK; 'auto' and a bare 'cuda' then mean cuda:LOCAL_RANK. The device is also made current, since
NCCL communicators, Triton launches and DeepSpeed's own placement all use the current CUDA device.
"""

from __future__ import annotations

import os

import torch

from fastgrpo.errors import ConfigError

DEVICE_HELP = "'auto' (CUDA when available, cuda:LOCAL_RANK under a launcher), 'cpu' or 'cuda[:N]'"


def _local_ranks() -> tuple[int | None, int]:
    """(LOCAL_RANK or None, processes on this machine) from the launcher's environment."""
    local_rank = os.environ.get("LOCAL_RANK")
    local_size = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    try:
        return (None if local_rank is None else int(local_rank)), int(local_size)
    except ValueError:
        raise ConfigError(f"LOCAL_RANK={local_rank!r} / local world size {local_size!r} are not integers") from None


def resolve_device(name: str, *, setting: str = "run.device") -> torch.device:
    """The torch.device for a device setting ('auto', 'cpu', 'cuda', 'cuda:N'); a CUDA device is made current.

    ConfigError when CUDA is asked for and absent, when the index is out of range, or when a launcher runs several
    processes on this machine and the setting pins them all to one GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise ConfigError(f"{setting} must be {DEVICE_HELP}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name!r} but CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting} must be {DEVICE_HELP}, got {name!r}") from None
    local_rank, local_size = _local_ranks()
    if device.index is None:
        device = torch.device("cuda", local_rank or 0)
    elif local_size > 1:
        raise ConfigError(f"{setting}={name!r} puts all {local_size} processes of this machine on one GPU; use "
                          "'auto' or 'cuda' (each process takes cuda:LOCAL_RANK)")
    count = torch.cuda.device_count()
    if device.index >= count:
        raise ConfigError(f"{setting}: {device} does not exist; this process sees {count} GPU(s)"
                          + (f" (LOCAL_RANK={local_rank})" if local_rank is not None else ""))
    torch.cuda.set_device(device)
    return device


def configure_cuda_math(device: torch.device, *, allow_tf32: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on `device` (process-wide switches; nothing on CPU)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
