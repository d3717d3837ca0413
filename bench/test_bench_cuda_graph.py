"""A rollout step (one CFG UNet call + the fused DDIM step) captured in a CUDA graph and replayed.

Capture fails on any host sync or host-device copy inside the step, so this is also the GPU-side proof that the
denoising loop has none (tests/test_cuda_path.py checks the same with fake CUDA tensors on CPU). The replay must
match an eager step, and its time is compared with eager side by side (the launch overhead a graph removes).
CUDA graphs exist on CUDA devices only; the model size follows FASTGRPO_BENCH_UNET as in test_bench_unet.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, device_info, interleaved_medians
from fastgrpo import ops
from fastgrpo.diffusion import Guidance, unet_outputs
from test_bench_unet import MODEL, SIZES, build_unet

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs exist on CUDA devices only")


@pytest.mark.parametrize("autocast", [False, True])
def test_rollout_step_graph_replay(benchmark, autocast):
    unet = build_unet().to(DEVICE).eval()
    batch = SIZES["samples"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    latents = torch.randn(batch, *SIZES["latent"], device=DEVICE, generator=gen)          # (B, C, H, W)
    noise = torch.randn(batch, *SIZES["latent"], device=DEVICE, generator=gen)
    embeds = torch.randn(batch, *SIZES["text"], device=DEVICE, generator=gen)              # (B, L, D)
    uncond = torch.randn(1, *SIZES["text"], device=DEVICE, generator=gen).expand_as(embeds)
    timesteps = torch.full((batch,), 501, device=DEVICE, dtype=torch.long)
    alpha_t, alpha_prev = torch.full((batch,), 0.3, device=DEVICE), torch.full((batch,), 0.35, device=DEVICE)
    guidance = Guidance(1.0, 5.0, "epsilon", autocast_bf16=autocast)

    @torch.no_grad()
    def step():
        cond, uncond_out = unet_outputs(unet, latents, timesteps, embeds, uncond, guidance)
        return ops.ddim_step(cond, latents, alpha_t, alpha_prev, noise, uncond_output=uncond_out,
                             guidance_scale=guidance.guidance_scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured[0], eager[0])
    torch.testing.assert_close(captured[1], eager[1])
    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=20, warmup_rounds=2, iterations=1)
    medians = interleaved_medians({"graph": graph.replay, "eager": step})
    benchmark.extra_info.update(device_info(), model=MODEL, autocast_bf16=autocast, batch=batch,
                                graph_ms=medians["graph"] * 1e3, eager_ms=medians["eager"] * 1e3,
                                eager_over_graph=medians["eager"] / medians["graph"],
                                max_abs_difference=float((captured[0] - eager[0]).abs().max()))
