"""Attention for UNet calls on CPU with small heads: fastgrpo's C++ kernel, forward and backward.

PyTorch's CPU attention runs each (batch, head) pair as GEMM calls whose inner size is the head dim. With heads of
dim 3 or 6 (the toy worlds' UNets: diffusers reads their `attention_head_dim` 16 as 16 heads of 48 and 96 channels)
those calls cost more than the softmax itself, and attention took about 40% of a UNet call. The C++ kernel
(csrc/attention_cpu.cpp) loops over keys with unit stride instead and reads the projections in their (B, L, H, D)
layout without transposes. It is used for heads of dim <= SMALL_HEAD_DIM, where it was measured faster
(`bench/test_bench_attention.py`); larger heads, masks, autocast and other devices go to PyTorch SDPA.

This module needs only torch (and the extension); `FastgrpoAttnProcessor` imports diffusers when it is created.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastgrpo.ops.dispatch import cpp_kernels

# Head dims up to this use the C++ kernel. `bench/test_bench_attention.py` on a 2-core AVX2 CPU (fp32, forward +
# backward): the toy UNets' dims 3 and 6 2.3-3.5x and dim 8 1.7x faster than PyTorch SDPA; dim 16 1.4x slower.
SMALL_HEAD_DIM = 8


def small_head_kernel_unavailable(tensor: torch.Tensor, head_dim: int) -> str | None:
    """None when the C++ kernel serves attention on `tensor`'s device and dtype at this head dim, else why not."""
    if tensor.device.type != "cpu":
        return f"device {tensor.device.type} (CPU only)"
    if tensor.dtype not in (torch.float32, torch.float64):
        return f"dtype {tensor.dtype} (float32 and float64 only)"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    if head_dim > SMALL_HEAD_DIM:
        return f"head dim {head_dim} > {SMALL_HEAD_DIM}, where PyTorch SDPA is faster"
    return cpp_kernels()[1]


class _SmallHeadAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale):
        out, lse = cpp_kernels()[0].attention_forward(query, key, value, scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        grads = cpp_kernels()[0].attention_backward(query, key, value, out, lse, grad_out.contiguous(), ctx.scale)
        return (*grads, None)


def small_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per head. query (B, Lq, H, D), key and value (B, Lk, H, D); returns (B, Lq, H, D).

    The layout is the projections' own (B, L, H * D) viewed per head (not SDPA's (B, H, L, D)). scale defaults to
    1 / sqrt(D), as in SDPA. CPU float32/float64 tensors, through the C++ extension; differentiable once.
    """
    module, reason = cpp_kernels()
    if module is None:
        raise RuntimeError(f"small_head_attention: {reason}")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("small_head_attention: query, key and value must be (B, L, H, D)")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return _SmallHeadAttention.apply(query.contiguous(), key.contiguous(), value.contiguous(), scale)


class FastgrpoAttnProcessor:
    """A diffusers attention processor: the C++ small-head kernel where it serves the call, else diffusers'
    `AttnProcessor2_0` (PyTorch SDPA) unchanged.

    The kernel path covers what the UNet's transformer blocks use: 3-D hidden states, self- or cross-attention,
    no mask, no group/spatial/q/k norms, output projection, optional residual and output rescale; anything else is
    handed to the fallback whole. Like `AttnProcessor2_0`, it scales scores by 1 / sqrt(head dim).
    """

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()

    def kernel_serves(self, attn, hidden_states, attention_mask) -> bool:
        # attributes a diffusers version may lack count as "not plain", so such modules keep diffusers' processor
        extras = ("spatial_norm", "group_norm", "norm_cross", "norm_q", "norm_k")
        plain = (attention_mask is None and hidden_states.dim() == 3
                 and all(getattr(attn, name, True) in (None, False) for name in extras)
                 and getattr(attn, "inner_kv_dim", None) == getattr(attn, "inner_dim", 0))
        return plain and small_head_kernel_unavailable(hidden_states, attn.inner_dim // attn.heads) is None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if args or kwargs or not self.kernel_serves(attn, hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, heads = hidden_states.shape[0], attn.heads
        head_dim = attn.inner_dim // heads
        query = attn.to_q(hidden_states).view(batch, -1, heads, head_dim)
        key = attn.to_k(context).view(batch, -1, heads, head_dim)
        value = attn.to_v(context).view(batch, -1, heads, head_dim)
        out = small_head_attention(query, key, value).view(batch, -1, heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def uses_small_head_kernel(unet: torch.nn.Module) -> bool:
    """Whether any attention module of `unet` has heads small enough for the C++ kernel (and it is built)."""
    from diffusers.models.attention_processor import Attention

    if cpp_kernels()[0] is None:
        return False
    return any(isinstance(m, Attention) and m.inner_dim // m.heads <= SMALL_HEAD_DIM for m in unet.modules())
