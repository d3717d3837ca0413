"""The advantage-weighted matching loss (`ops.matching_loss`) and the NFT loss (`ops.nft_loss`), forward + backward,
each against its eager reference and torch.compile(reference), side by side in one run (`interleaved_medians`).

Shapes: 32 (sample, draw) rows of SD v1.x latents (4 x 64 x 64) and 64 rows of 4 x 128 x 128; guided prediction
(cond + uncond) with a KL reference and stored old surrogates, as train.objective=awm with
train.matching_prediction=guided and train.kl_coef > 0 calls it. extra_info records the bytes-moved formula, GB/s,
the fraction of measured copy bandwidth and both speedups; targets are recorded, not asserted (noisy machines).
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, copy_bandwidth, device_info, interleaved_medians, launches_per_call, peak_memory
from fastgrpo import ops
from fastgrpo.ops import reference

SHAPES = {"sd": (32, 4, 64, 64), "large": (64, 4, 128, 128)}


def matching_tensors(shape):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    cond, uncond, target, ref = (torch.randn(shape, generator=gen, device=DEVICE) for _ in range(4))
    batch = shape[0]
    advantages = torch.randn(batch, generator=gen, device=DEVICE)
    guided = uncond + 4.0 * (cond - uncond)
    old = -((guided - target) ** 2).flatten(1).mean(1) + 1e-3 * torch.randn(batch, generator=gen, device=DEVICE)
    return cond, uncond, target, ref, advantages, old


def runner(fn, tensors):
    cond, uncond, target, ref, advantages, old = tensors
    leaves = [cond.clone().requires_grad_(True), uncond.clone().requires_grad_(True)]

    def run():
        for leaf in leaves:
            leaf.grad = None
        loss = fn(leaves[0], target, advantages, clip_range=1e-2, old_surrogates=old, uncond_prediction=leaves[1],
                  guidance_scale=4.0, reference_prediction=ref, kl_coef=0.1)[0]
        loss.backward()
    return run


def measure(benchmark, op_name, runners, shape_name, tensors, reads_fwd, reads_bwd):
    """Interleaved medians of runners {fused, eager, compiled}, the pytest-benchmark run of fused, and extra_info."""
    fused = runners["fused"]
    small = shape_name == "sd"
    medians = interleaved_medians(runners, block=21 if small else 5)
    benchmark.pedantic(fused, rounds=50 if small else 10, warmup_rounds=5 if small else 2, iterations=1)
    seconds = benchmark.stats.stats.median
    numel = tensors[0].numel()
    bytes_moved = numel * 4 * (reads_fwd + reads_bwd + 2)   # the backward writes two gradients (fp32)
    copy = copy_bandwidth(bytes_moved)
    speedup_eager, speedup_compiled = medians["eager"] / medians["fused"], medians["compiled"] / medians["fused"]
    benchmark.extra_info.update(
        device_info(), backend=ops.explain(op_name, DEVICE)[0], shape=list(SHAPES[shape_name]),
        bytes_moved=bytes_moved,
        bytes_formula=f"numel*4*({reads_fwd} reads fwd + {reads_bwd} reads and 2 writes bwd)",
        gbps=bytes_moved / seconds / 1e9, copy_gbps=copy / 1e9, fraction_of_copy=bytes_moved / seconds / copy,
        eager_s=medians["eager"], compiled_s=medians["compiled"], fused_interleaved_s=medians["fused"],
        speedup_vs_eager=speedup_eager, speedup_vs_compiled=speedup_compiled, **launches_per_call(fused),
        peak_memory_bytes=peak_memory(fused), target_vs_eager=3.0, target_vs_compiled=1.0,
        meets_targets=speedup_eager >= 3.0 and speedup_compiled >= 1.0)


@pytest.mark.parametrize("shape_name", ["sd", "large"])
def test_matching_loss_forward_backward(benchmark, shape_name):
    tensors = matching_tensors(SHAPES[shape_name])
    runners = {"fused": runner(ops.matching_loss, tensors), "eager": runner(reference.matching_loss, tensors),
               "compiled": runner(torch.compile(reference.matching_loss, dynamic=False), tensors)}
    # forward reads cond, uncond, target, ref; the backward reads them again
    measure(benchmark, "matching_loss", runners, shape_name, tensors, 4, 4)


def nft_runner(fn, tensors):
    cond, uncond, target, ref, advantages, _ = tensors
    batch = cond.shape[0]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    old = target + 0.5 * torch.randn(cond.shape, generator=gen, device=DEVICE)
    scale = torch.rand(batch, generator=gen, device=DEVICE) * 3
    leaves = [cond.clone().requires_grad_(True), uncond.clone().requires_grad_(True)]

    def run():
        for leaf in leaves:
            leaf.grad = None
        loss = fn(leaves[0], target, old, advantages, scale, beta=1.0, adv_clip_max=2.5, uncond_prediction=leaves[1],
                  guidance_scale=4.0, reference_prediction=ref, kl_coef=0.1)[0]
        loss.backward()
    return run


@pytest.mark.parametrize("shape_name", ["sd", "large"])
def test_nft_loss_forward_backward(benchmark, shape_name):
    """The NFT loss (`ops.nft_loss`) as train.objective=nft calls it with guided training predictions and a KL
    reference: forward and backward both read cond, uncond, target, old and ref."""
    tensors = matching_tensors(SHAPES[shape_name])
    runners = {"fused": nft_runner(ops.nft_loss, tensors), "eager": nft_runner(reference.nft_loss, tensors),
               "compiled": nft_runner(torch.compile(reference.nft_loss, dynamic=False), tensors)}
    measure(benchmark, "nft_loss", runners, shape_name, tensors, 5, 5)
