"""fastgrpo's small-head CPU attention (`fastgrpo.attention`) against PyTorch SDPA, side by side in one run.

- op: the four attention shapes of the colour world's UNet at the rollout's CFG batch (128: self-attention over
  8x8 and 4x4 latents with heads of dim 3 and 6, cross-attention over 24 text tokens), plus heads of dim 8 and 16 at
  the threshold (SMALL_HEAD_DIM = 8) and SD v1.x's dim 40: forward and forward+backward.
- unet: the colour world's UNet as the trainer calls it, with each processor (engine.attention 'auto' vs 'sdpa'):
  a rollout call (batch 128 with CFG, no grad) and a training call (batch 64, forward+backward to the
  cross-attention's text projections, the default recipe's trainable layers).

extra_info holds each variant's median (alternating blocks, `interleaved_medians`) and the speedup. CPU only: on
CUDA the trainer uses PyTorch's kernels.

    python -m pytest bench/test_bench_attention.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, device_info, interleaved_medians

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the small-head kernel is a CPU kernel")

OP_SHAPES = {  # (B, Lq, Lk, H, D)
    "toy_self_8x8": (128, 64, 64, 16, 3),
    "toy_cross_8x8": (128, 64, 24, 16, 3),
    "toy_self_4x4": (128, 16, 16, 16, 6),
    "toy_cross_4x4": (128, 16, 24, 16, 6),
    "dim8": (64, 64, 64, 4, 8),
    "dim16": (64, 64, 64, 4, 16),
    "sd_dim40_cross": (4, 256, 77, 8, 40),
}


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape_name", list(OP_SHAPES))
def test_attention_op(benchmark, shape_name, mode):
    from fastgrpo.attention import small_head_attention
    from fastgrpo.ops.dispatch import cpp_kernels

    if cpp_kernels()[0] is None:
        pytest.skip(cpp_kernels()[1])
    batch, lq, lk, heads, dim = OP_SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, length, heads, dim, generator=gen).requires_grad_(mode != "forward")
               for length in (lq, lk, lk))
    grad = torch.randn(batch, lq, heads, dim, generator=gen)

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def run(fn):
        if mode == "forward":
            return lambda: fn()
        return lambda: fn().backward(grad)

    fns = {"fastgrpo": run(lambda: small_head_attention(q, k, v)), "sdpa": run(sdpa)}
    medians = interleaved_medians(fns)
    benchmark(fns["fastgrpo"])
    benchmark.extra_info.update(device_info(), shape=OP_SHAPES[shape_name], mode=mode,
                                fastgrpo_ms=medians["fastgrpo"] * 1e3, sdpa_ms=medians["sdpa"] * 1e3,
                                speedup_vs_sdpa=medians["sdpa"] / medians["fastgrpo"])


@pytest.mark.parametrize("mode", ["rollout", "train"])
def test_toy_unet_call(benchmark, mode):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from fastgrpo.attention import FastgrpoAttnProcessor
    from fastgrpo.models import load_diffusion_models, select_trainable

    unet = load_diffusion_models("builtin:toyworld", device=DEVICE).unet
    select_trainable(unet, ["attn2.to_k", "attn2.to_v"])
    batch = 128 if mode == "rollout" else 64
    gen = torch.Generator().manual_seed(0)
    latents, text = torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 24, 64, generator=gen)
    timesteps = torch.full((batch,), 500)
    processors = {"fastgrpo": FastgrpoAttnProcessor(), "sdpa": AttnProcessor2_0()}

    def call(name):
        def run():
            unet.set_attn_processor(processors[name])
            if mode == "rollout":
                with torch.no_grad():
                    unet(latents, timesteps, encoder_hidden_states=text)
            else:
                unet.zero_grad(set_to_none=True)
                unet(latents, timesteps, encoder_hidden_states=text).sample.square().mean().backward()
        return run

    fns = {name: call(name) for name in processors}
    medians = interleaved_medians(fns, block=4, min_time=5.0)
    benchmark.pedantic(fns["fastgrpo"], rounds=5, iterations=1)
    benchmark.extra_info.update(device_info(), mode=mode, batch=batch, fastgrpo_ms=medians["fastgrpo"] * 1e3,
                                sdpa_ms=medians["sdpa"] * 1e3, speedup_vs_sdpa=medians["sdpa"] / medians["fastgrpo"])
