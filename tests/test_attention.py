"""fastgrpo.attention: the small-head C++ attention against float64 PyTorch attention, and the diffusers processor
against diffusers' own `AttnProcessor2_0`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastgrpo.attention import (SMALL_HEAD_DIM, FastgrpoAttnProcessor, small_head_attention,
                                small_head_kernel_unavailable)
from fastgrpo.ops.dispatch import cpp_kernels

pytestmark = pytest.mark.skipif(cpp_kernels()[0] is None, reason="the C++ extension is not built")


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v in float64 from its definition, in the (B, L, H, D) layout."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2)


def inputs(batch, lq, lk, heads, dim, *, dtype=torch.float32, score_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, lq, heads, dim, generator=gen, dtype=torch.float64) * score_scale
    k = torch.randn(batch, lk, heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, lk, heads, dim, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, lq, heads, dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], grad.to(dtype)


def relative_error(actual, expected):
    """max |actual - expected| over max |expected|, or the absolute error where that is below 1 (one key: dq = 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0))


# head dims 1-8 take the compile-time (lane) kernels, 12 and 40 the generic one; 37 query rows leave a partial lane
# block, one key is the degenerate softmax; score_scale 12 puts scores 100s apart, so most weights underflow
@pytest.mark.parametrize("dim", [1, 2, 3, 5, 6, 8, 12, 40])
@pytest.mark.parametrize("lq,lk,score_scale", [(37, 24, 1.0), (16, 1, 1.0), (21, 70, 12.0)])
def test_forward_and_backward_match_float64_attention(dim, lq, lk, score_scale):
    (q, k, v), grad = inputs(2, lq, lk, 3, dim, score_scale=score_scale)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = small_head_attention(*leaves)
    out.backward(grad)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    expected = reference_attention(*ref_leaves)
    expected.backward(grad.double())
    assert out.dtype == torch.float32 and out.shape == (2, lq, 3, dim)
    assert relative_error(out, expected) < 2e-6
    for leaf, ref in zip(leaves, ref_leaves):
        assert relative_error(leaf.grad, ref.grad) < 2e-5


@pytest.mark.parametrize("dim", [3, 12])
def test_float64_gradients_pass_gradcheck(dim):
    (q, k, v), _ = inputs(1, 5, 7, 2, dim, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(small_head_attention, leaves, eps=1e-6, atol=1e-8)
    out = small_head_attention(*leaves)
    assert relative_error(out, reference_attention(q, k, v)) < 1e-13


def test_results_do_not_depend_on_threads_or_on_the_rest_of_the_batch():
    (q, k, v), grad = inputs(6, 40, 24, 4, 3)
    threads = torch.get_num_threads()

    def run(q, k, v, grad):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = small_head_attention(*leaves)
        out.backward(grad)
        return [out, *(leaf.grad for leaf in leaves)]
    try:
        torch.set_num_threads(1)
        one = run(q, k, v, grad)
        torch.set_num_threads(2)
        two = run(q, k, v, grad)
    finally:
        torch.set_num_threads(threads)
    part = run(q[2:4], k[2:4], v[2:4], grad[2:4])   # rows 2-3 alone, as a different micro-batch would hold them
    for a, b, c in zip(one, two, part):
        assert torch.equal(a, b) and torch.equal(a[2:4], c)


def test_kernel_refuses_what_it_does_not_serve():
    (q, k, v), _ = inputs(1, 4, 4, 2, 3)
    with pytest.raises(ValueError, match=r"\(B, L, H, D\)"):
        small_head_attention(q[0], k[0], v[0])
    with pytest.raises(RuntimeError, match="shapes do not match"):
        small_head_attention(q, k[..., :2], v[..., :2])
    assert "head dim 16" in small_head_kernel_unavailable(q, 16)
    assert "dtype" in small_head_kernel_unavailable(q.half(), 3)
    assert small_head_kernel_unavailable(q, SMALL_HEAD_DIM) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in small_head_kernel_unavailable(q, 3)


@pytest.fixture(scope="module")
def toy_unet():
    from fastgrpo.models import load_diffusion_models, select_trainable

    unet = load_diffusion_models("builtin:toyworld", device=torch.device("cpu")).unet
    select_trainable(unet, ["attn2.to_k", "attn2.to_v"])
    return unet


def unet_call(unet, processor, *, seed=0, batch=3):
    """Output and the text projections' gradients of one UNet call with `processor`."""
    unet.set_attn_processor(processor)
    gen = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 24, 64, generator=gen)
    unet.zero_grad(set_to_none=True)
    out = unet(latents, torch.tensor([999, 500, 20][:batch]), encoder_hidden_states=text).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in unet.parameters() if p.requires_grad]


def test_processor_gives_diffusers_unet_outputs_and_gradients(toy_unet, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    import fastgrpo.attention as attention

    calls = []
    real = attention._SmallHeadAttention.apply
    monkeypatch.setattr(attention._SmallHeadAttention, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    out, grads = unet_call(toy_unet, FastgrpoAttnProcessor())
    expected, expected_grads = unet_call(toy_unet, AttnProcessor2_0())
    # the toy UNet: 7 transformer blocks, self- and cross-attention each, heads of dim 3 and 6
    assert len(calls) == 14 and {shape[-1] for shape in calls} == {3, 6}
    assert relative_error(out, expected.double()) < 1e-5
    assert len(grads) == 14
    for grad, ref in zip(grads, expected_grads):
        assert relative_error(grad, ref.double()) < 1e-4


def test_processor_hands_other_calls_to_sdpa_unchanged(toy_unet, monkeypatch):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    import fastgrpo.attention as attention

    monkeypatch.setattr(attention._SmallHeadAttention, "apply", lambda *a: pytest.fail("kernel used"))
    gen = torch.Generator().manual_seed(0)
    big_heads = Attention(query_dim=32, heads=2, dim_head=16)           # head dim 16 > SMALL_HEAD_DIM
    small_heads = Attention(query_dim=12, heads=4, dim_head=3)
    mask = torch.zeros(2, 1, 5)
    mask[:, :, -1] = -1e4
    cases = [(big_heads, torch.randn(2, 5, 32, generator=gen), {}),
             (small_heads, torch.randn(2, 5, 12, generator=gen), {"attention_mask": mask}),
             (small_heads, torch.randn(2, 12, 2, 3, generator=gen), {})]  # 4-D (image) hidden states
    for attn, hidden, kwargs in cases:
        attn.set_processor(FastgrpoAttnProcessor())
        ours = attn(hidden, **kwargs)
        attn.set_processor(AttnProcessor2_0())
        assert torch.equal(ours, attn(hidden, **kwargs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_ours = unet_call(toy_unet, FastgrpoAttnProcessor(), batch=2)[0]
        bf16_stock = unet_call(toy_unet, AttnProcessor2_0(), batch=2)[0]
    assert torch.equal(bf16_ours, bf16_stock)


def test_configure_unet_auto_picks_the_kernel_only_for_small_heads(toy_unet, tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    from fastgrpo.models import configure_unet

    assert configure_unet(toy_unet, attention="auto", gradient_checkpointing=False) == "fastgrpo-cpu"
    assert all(isinstance(p, FastgrpoAttnProcessor) for p in toy_unet.attn_processors.values())
    assert configure_unet(toy_unet, attention="sdpa", gradient_checkpointing=False) == "sdpa"
    wide = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2)                   # 2 heads: dims 32 and 64
    assert configure_unet(wide, attention="auto", gradient_checkpointing=False) == "sdpa"
    assert not any(isinstance(p, FastgrpoAttnProcessor) for p in wide.attn_processors.values())
