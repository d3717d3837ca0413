"""Benchmark helpers: device, timing of the comparison variants, copy bandwidth, launch counts, NVML stats.

Run:  python -m pytest bench -q --benchmark-json bench/results.json
Each benchmark times the fused op with pytest-benchmark and, in the same run, times it again alongside the eager and
compiled references in alternating blocks (`interleaved_medians`), recording the ratios of those medians in
extra_info. On CUDA the same suite runs unchanged.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "0")  # benchmarks time real kernels, never the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

from fastgrpo.allocator import keep_freed_memory  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MALLOC_TUNED = keep_freed_memory() if DEVICE.type == "cpu" else False


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, *, min_time=0.5, min_rounds=5, warmup=2) -> float:
    """Median wall time of fn() (synchronised), over at least min_rounds and min_time seconds."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_rounds or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict, *, block=10, min_time=1.0, min_rounds=5, warmup=2) -> dict:
    """Median wall time per call of each of several functions, timed in alternating blocks: each round runs every
    function `block` times back to back (the first call of a block is not timed, so each variant is measured in its
    own steady state, caches and allocator warm), rotating which goes first. Ratios of these medians compare the
    variants under the same machine load, which on a shared machine drifts between one long block and the next."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times: dict = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or time.perf_counter() - start < min_time:
        for k in range(len(names)):
            name = names[(rounds + k) % len(names)]
            fns[name]()
            sync()
            for _ in range(block - 1):
                t0 = time.perf_counter()
                fns[name]()
                sync()
                times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


def copy_bandwidth(bytes_moved: int) -> float:
    """Measured copy bandwidth in bytes/s (read + write) with the same working set as the op: a copy that moves
    `bytes_moved` bytes in all (so a working set that spills the caches is compared with one that spills too)."""
    src = torch.randn(max(1, bytes_moved // 8), device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src))


def launches_per_call(fn) -> dict:
    """{'launches_per_call': CUDA kernels launched by one call} on CUDA; on CPU, where nothing is launched,
    {'top_level_ops_per_call': the top-level operators it dispatches (no-op dtype/layout checks included)}."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    fn()
    sync()
    with profile(activities=activities) as prof:
        fn()
        sync()
    events = prof.events()
    if DEVICE.type == "cuda":
        return {"launches_per_call": sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)}
    top_level = [e for e in events if e.cpu_parent is None and not e.name.startswith(("autograd::", "["))]
    return {"top_level_ops_per_call": len(top_level)}


def device_info() -> dict:
    info = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "torch": torch.__version__, "malloc_tuned": MALLOC_TUNED}
    if DEVICE.type == "cuda":
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            info.update(nvml_sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                        nvml_mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
                        nvml_power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                        nvml_temperature_c=pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        except Exception as error:  # noqa: BLE001 - NVML is optional
            info["nvml"] = f"unavailable ({type(error).__name__})"
    return info


def peak_memory(fn) -> int | None:
    """Peak device memory of one call in bytes (CUDA); None on CPU, where torch keeps no allocator statistics."""
    if DEVICE.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture
def device() -> torch.device:
    return DEVICE


OPT_IN = ("sd_scale", "samples_to_target")  # minutes each on a CPU (sd_scale: 4.3 GB of disk too)


def pytest_collection_modifyitems(config, items):
    """Benchmarks marked with an OPT_IN marker run only when asked for: -m sd_scale, -m samples_to_target."""
    asked = config.getoption("markexpr") or ""
    skipped = [marker for marker in OPT_IN if marker not in asked]
    deselected = [item for item in items if any(marker in item.keywords for marker in skipped)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
