"""Time the Triton kernels' fixed block sizes against alternatives on a GPU (the launchers use fixed settings).

    python bench/tune_triton.py [--shape 16 4 64 64]

Prints median microseconds and GB/s per BLOCK for the log-prob forward and backward; put the winner in
kernels/fastgrpo_kernels/step_logprob.py. Needs CUDA (the interpreter says nothing about GPU speed).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 4, 64, 64])
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_triton: needs a CUDA device", file=sys.stderr)
        return 2
    import fastgrpo_kernels.step_logprob as kernel_module
    from fastgrpo import ops
    from triton.testing import do_bench

    cond, uncond, sample, prev = (torch.randn(args.shape, device="cuda") for _ in range(4))
    alpha_t = torch.linspace(0.1, 0.9, args.shape[0], device="cuda")
    alpha_prev = alpha_t + 0.02
    numel = cond.numel()
    for block in args.blocks:
        kernel_module.BLOCK = block
        leaves = [cond.clone().requires_grad_(True), uncond.clone().requires_grad_(True)]

        def forward():
            return ops.ddim_logprob(leaves[0], sample, prev, alpha_t, alpha_prev, uncond_output=leaves[1],
                                    guidance_scale=5.0, backend="triton")

        fwd_ms = do_bench(forward)
        out = forward()
        bwd_ms = do_bench(lambda: torch.autograd.grad(out, leaves, torch.ones_like(out), retain_graph=True))
        # forward: 4 reads + the residual written; backward: the residual read, two gradients written (fp32)
        print(f"BLOCK={block:5d}  forward {fwd_ms * 1e3:8.1f} us {20 * numel / fwd_ms / 1e6:7.1f} GB/s   "
              f"backward {bwd_ms * 1e3:8.1f} us {12 * numel / bwd_ms / 1e6:7.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
