"""Fused backends (Triton under TRITON_INTERPRET=1, C++) against the reference and float64 math."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from fastgrpo import ops
from fastgrpo.ops import reference, step
from fastgrpo.ops.dispatch import cpp_kernels

from conftest import TEST_DEVICE as DEVICE
from conftest import assert_compiled_gradients_match

FUSED = ["cpp", "triton"] if DEVICE.type == "cpu" else ["triton"]


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("FASTGRPO_BACKEND", raising=False)


def test_cpp_extension_is_built():
    """CI installs with --no-build-isolation, so the C++ path must be present (not silently the reference)."""
    module, reason = cpp_kernels()
    assert module is not None, reason
    assert ops.explain("ddim_logprob", "cpu")[0] == "cpp"


def step_inputs(batch=3, shape=(4, 5, 7), seed=0, dtype=torch.float32, with_uncond=True):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, *shape, generator=gen, dtype=torch.float64) for _ in range(4)]
    alpha_t = torch.rand(batch, generator=gen, dtype=torch.float64) * 0.8 + 0.05
    alpha_prev = alpha_t + (1 - alpha_t) * torch.rand(batch, generator=gen, dtype=torch.float64) * 0.5
    cond, uncond, sample, other = (t.to(DEVICE, dtype) for t in tensors)
    return cond, (uncond if with_uncond else None), sample, other, alpha_t.to(DEVICE, dtype), \
        alpha_prev.to(DEVICE, dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_uncond", [True, False])
def test_logprob_forward_matches_reference_fp64(backend, prediction_type, reduction, with_uncond):
    cond, uncond, sample, prev, alpha_t, alpha_prev = step_inputs(dtype=torch.float64, with_uncond=with_uncond)
    kwargs = dict(eta=0.8, uncond_output=uncond, guidance_scale=4.0, prediction_type=prediction_type,
                  reduction=reduction)
    expected = reference.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, **kwargs)
    got = ops.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, backend=backend, **kwargs)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(1, (4, 8, 8)), (2, (3, 37, 41)), (5, (1,))])  # B=1; N not a block multiple
def test_step_matches_reference_and_its_own_logprob(backend, shape):
    batch, dims = shape
    cond, uncond, sample, noise, alpha_t, alpha_prev = step_inputs(batch, dims, seed=1)
    prev_ref, lp_ref = reference.ddim_step(cond, sample, alpha_t, alpha_prev, noise, uncond_output=uncond,
                                           guidance_scale=7.5)
    prev, lp = ops.ddim_step(cond, sample, alpha_t, alpha_prev, noise, uncond_output=uncond, guidance_scale=7.5,
                             backend=backend)
    torch.testing.assert_close(prev, prev_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-4, atol=1e-4)
    again = ops.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, uncond_output=uncond, guidance_scale=7.5,
                             backend=backend)
    torch.testing.assert_close(again, lp, rtol=0, atol=2e-6)  # ratio == 1 on-policy, within one backend


@pytest.mark.parametrize("backend", FUSED)
def test_logprob_gradcheck_fp64(backend):
    cond, uncond, sample, prev, alpha_t, alpha_prev = step_inputs(2, (3, 4, 5), seed=2, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (cond, uncond, sample, prev)]

    def fn(c, u, x, p):
        return ops.ddim_logprob(c, x, p, alpha_t, alpha_prev, uncond_output=u, guidance_scale=3.0, eta=0.7,
                                prediction_type="v_prediction", backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", FUSED)
def test_step_gradients_match_reference(backend):
    cond, uncond, sample, noise, alpha_t, alpha_prev = step_inputs(2, (2, 3, 3), seed=3, dtype=torch.float64)
    grads = {}
    for name in ("reference", backend):
        inputs = [t.clone().requires_grad_(True) for t in (cond, uncond, sample, noise)]
        prev, lp = ops.ddim_step(inputs[0], inputs[2], alpha_t, alpha_prev, inputs[3], uncond_output=inputs[1],
                                 guidance_scale=2.0, backend=name)
        (prev.sum() * 0.3 + lp.sum()).backward()
        grads[name] = [t.grad for t in inputs]
    for got, expected in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(("with_uncond", "wanted"), [(True, (0, 1, 2, 3)), (True, (0,)), (True, (1,)),
                                                     (False, (0,)), (False, (0, 2, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_gradients_match_fp64_reference(backend, with_uncond, wanted, dtype):
    """Each requested gradient (wanted: indices into cond, uncond, x_t, x_{t-1}; the backward reads only the
    forward's residual) against autograd through the float64 reference, in its input's dtype."""
    cond, uncond, sample, prev, alpha_t, alpha_prev = step_inputs(3, (4, 9, 11), seed=9, dtype=dtype,
                                                                  with_uncond=with_uncond)
    weights = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64, device=DEVICE)  # a grad_out that differs per sample
    kwargs = dict(eta=0.9, guidance_scale=6.0, prediction_type="epsilon", reduction="sum")
    grads = {}
    for name, cast in (("reference", torch.float64), (backend, dtype)):
        inputs = [None if t is None else t.to(cast).requires_grad_(k in wanted)
                  for k, t in enumerate((cond, uncond, sample, prev))]
        log_prob = ops.ddim_logprob(inputs[0], inputs[2], inputs[3], alpha_t.to(cast), alpha_prev.to(cast),
                                    uncond_output=inputs[1], backend=name, **kwargs)
        (log_prob.double() * weights).sum().backward()
        grads[name] = {k: inputs[k].grad for k in wanted}
    for k in wanted:
        got, expected = grads[backend][k], grads["reference"][k]
        assert got.dtype == dtype
        scale = expected.abs().max().item()
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("backend", FUSED)
def test_logprob_refuses_higher_order_gradients(backend):
    """The fused backward is not differentiable itself: a second derivative is an error, not a silent zero (C++:
    create_graph=True is refused; Triton: the first gradient carries no graph, as @once_differentiable does)."""
    cond, uncond, sample, prev, alpha_t, alpha_prev = step_inputs(2, (2, 3, 3), seed=12)
    leaf = cond.clone().requires_grad_(True)
    log_prob = ops.ddim_logprob(leaf, sample, prev, alpha_t, alpha_prev, uncond_output=uncond, backend=backend)
    with pytest.raises(RuntimeError, match="not differentiable|does not require grad"):
        torch.autograd.grad(log_prob.sum(), leaf, create_graph=True)[0].sum().backward()
    reference_grad, = torch.autograd.grad(
        ops.ddim_logprob(leaf, sample, prev, alpha_t, alpha_prev, uncond_output=uncond, backend="reference").sum(),
        leaf, create_graph=True)
    assert reference_grad.requires_grad  # the reference serves higher-order gradients


@pytest.mark.parametrize("backend", FUSED)
def test_logprob_without_gradient_builds_no_graph(backend):
    cond, uncond, sample, prev, alpha_t, alpha_prev = step_inputs(2, (2, 3, 3), seed=10)
    leaf = cond.clone().requires_grad_(True)
    with torch.no_grad():
        untracked = ops.ddim_logprob(leaf, sample, prev, alpha_t, alpha_prev, uncond_output=uncond, backend=backend)
    tracked = ops.ddim_logprob(leaf, sample, prev, alpha_t, alpha_prev, uncond_output=uncond, backend=backend)
    assert untracked.grad_fn is None and tracked.grad_fn is not None
    torch.testing.assert_close(untracked, tracked.detach(), rtol=0, atol=0)


class _RecordAtenOps(TorchDispatchMode):
    """Records each aten op's name and the most elements any of its tensor inputs or outputs holds."""

    def __init__(self):
        super().__init__()
        self.ops, self.sizes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.ops.append(func.overloadpacket.__name__)
        self.sizes.append(max((t.numel() for t in tensors), default=0))
        return out

    def large(self, allowed, limit):
        """Ops outside `allowed` that touch more than `limit` elements."""
        return [(op, size) for op, size in zip(self.ops, self.sizes) if op not in allowed and size > limit]


class _CountLaunches:
    """Stands in for a Triton kernel: counts its launches and runs them outside the recording (the interpreter
    copies arguments to and from the host, which a GPU launch does not)."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(self.kernel)
            with _disable_current_modes():
                return self.kernel[grid](*args, **kwargs)
        return launch


def test_triton_logprob_is_one_launch_each_way(monkeypatch):
    """On CUDA each aten op that touches memory is a launch of its own: besides its one kernel, the Triton
    log-prob's forward (with the residual) and backward (from an expanded grad_out, as a sum's backward passes)
    dispatch no zero-fill, copy or conversion of a latent-sized tensor: besides allocations and views the forward
    only builds the (B, 5) step table from the (B,) alphas, and the backward reuses it."""
    import fastgrpo_kernels.step_logprob as kernel_module
    launches = []
    for name in ("_step_logprob_fwd_kernel", "_step_logprob_bwd_kernel"):
        monkeypatch.setattr(kernel_module, name, _CountLaunches(getattr(kernel_module, name), launches))
    cond, uncond, sample, prev, alpha_t, alpha_prev = step_inputs(2, (4, 8, 8), seed=11)
    leaves = [cond.requires_grad_(True), uncond.requires_grad_(True)]
    allowed = {"empty", "empty_like", "empty_strided", "view", "_unsafe_view", "as_strided", "expand", "alias",
               "detach"}
    for _ in range(2):  # the first call may set up the per-stream counters
        launches.clear()
        with _RecordAtenOps() as forward_ops:
            log_prob = ops.ddim_logprob(leaves[0], sample, prev, alpha_t, alpha_prev, uncond_output=leaves[1],
                                        guidance_scale=5.0, backend="triton")
    assert forward_ops.large(allowed, limit=2 * 5) == [], forward_ops.ops
    assert launches == [kernel_module._step_logprob_fwd_kernel.kernel]
    residual, table = log_prob.grad_fn.saved_tensors
    torch.testing.assert_close(table, reference.ddim_coefficients(alpha_t.double(), alpha_prev.double(), eta=1.0,
                                                                  prediction_type="epsilon"), rtol=0, atol=0)
    grad_out = torch.ones((), device=DEVICE).expand(2)
    launches.clear()
    with _RecordAtenOps() as backward_ops:
        grads = step._backward(grad_out, residual, table, 5.0, "mean", True, (True, True, False, False), "triton")
    assert set(backward_ops.ops) <= allowed, backward_ops.ops
    assert launches == [kernel_module._step_logprob_bwd_kernel.kernel]
    expected = torch.autograd.grad(log_prob.sum(), leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_triton_advantages_and_loss_are_one_launch_each(monkeypatch):
    """Group advantages: one launch; the clipped-ratio loss: one forward launch and one backward launch, and around
    them only allocations and views (the loss is an output of its own, so its backward takes the upstream gradient
    without a zero-filled stats gradient)."""
    import importlib
    # the package re-exports functions of the same names, so take the modules themselves
    advantages_module = importlib.import_module("fastgrpo_kernels.group_advantages")
    loss_module = importlib.import_module("fastgrpo_kernels.grpo_loss")
    launches = []
    for module, name in ((advantages_module, "_group_advantages_kernel"), (loss_module, "_grpo_loss_fwd_kernel"),
                         (loss_module, "_grpo_loss_bwd_kernel")):
        monkeypatch.setattr(module, name, _CountLaunches(getattr(module, name), launches))
    log_probs, old, _, ref = loss_inputs(32, seed=12, dtype=torch.float32)
    rewards = torch.randn(32, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    leaf = log_probs.requires_grad_(True)
    upstream = torch.ones((), device=DEVICE)
    allowed = {"empty", "empty_like", "empty_strided", "view", "_unsafe_view", "as_strided", "expand", "alias",
               "detach", "select", "unbind", "unsqueeze", "squeeze"}
    with _RecordAtenOps() as forward_ops:
        advantages = ops.group_advantages(rewards, 8, clip=2.0, backend="triton")
        loss, _ = ops.grpo_loss(leaf, old, advantages, clip_range=0.05, ref_log_probs=ref, kl_coef=0.1,
                                backend="triton")
    assert set(forward_ops.ops) <= allowed, forward_ops.ops
    assert launches == [advantages_module._group_advantages_kernel.kernel, loss_module._grpo_loss_fwd_kernel.kernel]
    launches.clear()
    with _RecordAtenOps() as backward_ops:
        loss.backward(upstream)
    assert set(backward_ops.ops) <= allowed, backward_ops.ops
    assert launches == [loss_module._grpo_loss_bwd_kernel.kernel]
    expected_leaf = log_probs.detach().clone().requires_grad_(True)
    expected, _ = reference.grpo_loss(expected_leaf, old, reference.group_advantages(rewards, 8, clip=2.0),
                                      clip_range=0.05, ref_log_probs=ref, kl_coef=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(leaf.grad, expected_leaf.grad)


def test_triton_row_counters_are_reusable_across_calls_and_batch_sizes():
    """The forward's arrival counters are one zeroed buffer per stream that each launch leaves at zero: calls of
    several batch sizes (past the buffer's first size) in a row each match the reference."""
    for batch in (3, 70, 2, 70):
        cond, uncond, sample, prev, alpha_t, alpha_prev = step_inputs(batch, (2, 33, 35), seed=batch)
        kwargs = dict(uncond_output=uncond, guidance_scale=3.0)
        expected = reference.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, **kwargs)
        got = ops.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, backend="triton", **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def max_error(value, exact):
    return (value.double() - exact).abs().max().item()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_error_rule(backend, dtype):
    """Error vs fp64 on the same (rounded) inputs at most ~2x the error of PyTorch's own eager math in `dtype`."""
    cond, uncond, sample, prev, alpha_t, alpha_prev = step_inputs(4, (4, 16, 16), seed=4, dtype=dtype)
    exact = reference.ddim_logprob(*(t.double() for t in (cond, sample, prev, alpha_t, alpha_prev)),
                                   uncond_output=uncond.double(), guidance_scale=5.0)
    # PyTorch's own error: the reference formula evaluated entirely in `dtype` (no upcast).
    guided = uncond + 5.0 * (cond - uncond)
    table = reference.ddim_coefficients(alpha_t, alpha_prev, eta=1.0, prediction_type="epsilon")
    mean, std = reference.step_moments(guided, sample, table)
    torch_error = max_error(reference.gaussian_logprob(prev, mean, std.to(dtype), reduction="mean"), exact)
    got = ops.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, uncond_output=uncond, guidance_scale=5.0,
                           backend=backend)
    assert got.dtype == torch.float32
    assert max_error(got, exact) <= 2 * torch_error + 1e-6


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_match_reference(backend, std, unbiased):
    rewards = torch.randn(48, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    rewards[16:32] = 0.5  # a group with zero spread
    kwargs = dict(std=std, unbiased=unbiased, clip=1.5)
    got = ops.group_advantages(rewards, 16, backend=backend, **kwargs)
    torch.testing.assert_close(got, reference.group_advantages(rewards, 16, **kwargs), rtol=1e-5, atol=1e-5)
    if std == "group":
        assert torch.all(got[16:32] == 0)


@pytest.mark.parametrize("backend", FUSED)
def test_group_advantages_reject_group_ids(backend):
    with pytest.raises(ops.BackendUnavailableError, match="group ids are not supported"):
        ops.group_advantages(torch.zeros(4, device=DEVICE), torch.tensor([0, 0, 1, 1], device=DEVICE), backend=backend)
    assert ops.group_advantages(torch.tensor([1.0, 0.0, 3.0, 1.0]), torch.tensor([0, 0, 1, 1])).tolist() == \
        pytest.approx([0.7071, -0.7071, 0.7071, -0.7071], abs=1e-4)  # auto falls back to the reference


def loss_inputs(n, seed, spread=0.05, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(n, generator=gen, dtype=dtype)
    tensors = (old + spread * torch.randn(n, generator=gen, dtype=dtype), old,
               torch.randn(n, generator=gen, dtype=dtype), old + 0.1 * torch.randn(n, generator=gen, dtype=dtype))
    return tuple(t.to(DEVICE) for t in tensors)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("with_ref,clip_high", [(False, None), (True, None), (True, 0.08)])
@pytest.mark.parametrize("n", [1, 7, 2053])
def test_grpo_loss_matches_reference(backend, with_ref, clip_high, n):
    log_probs, old, adv, ref = loss_inputs(n, seed=n)
    ref = ref if with_ref else None
    results = {}
    for name in ("reference", backend):
        lp = log_probs.clone().requires_grad_(True)
        loss, stats = ops.grpo_loss(lp, old, adv, clip_range=0.03, ref_log_probs=ref, kl_coef=0.2, backend=name,
                                    clip_range_high=clip_high)
        loss.backward()
        results[name] = (loss.detach(), stats, lp.grad)
    (loss, stats, grad), (ref_loss, ref_stats, ref_grad) = results[backend], results["reference"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert stats.keys() == ref_stats.keys()
    for name in stats:
        torch.testing.assert_close(stats[name], ref_stats[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("normalised,weighted", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("with_ref", [False, True])
def test_grpo_loss_variants_match_the_reference_and_float64_loop(backend, normalised, weighted, with_ref):
    """RatioNorm (bias + scale, the bias differentiated) and per-entry weights: every backend against the reference,
    and the reference against a float64 loop over the entries written from the formula."""
    n = 257
    log_probs, old, adv, ref = loss_inputs(n, seed=21, spread=0.3)
    gen = torch.Generator().manual_seed(22)
    bias = (0.05 * torch.rand(n, generator=gen, dtype=torch.float64)).to(DEVICE) if normalised else None
    scale = (0.2 + 2 * torch.rand(n, generator=gen, dtype=torch.float64)).to(DEVICE) if normalised else None
    weights = (0.1 + 3 * torch.rand(n, generator=gen, dtype=torch.float64)).to(DEVICE) if weighted else None
    ref = ref if with_ref else None
    results = {}
    for name in ("reference", backend):
        lp = log_probs.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True) if normalised else None
        loss, stats = ops.grpo_loss(lp, old, adv, clip_range=0.1, clip_range_high=0.15, ref_log_probs=ref,
                                    kl_coef=0.3, ratio_bias=b, ratio_scale=scale, weights=weights, backend=name)
        loss.backward()
        results[name] = (loss.detach(), stats, lp.grad, b.grad if normalised else None)
    for got, want in zip(results[backend][:1] + results[backend][2:], results["reference"][:1] +
                         results["reference"][2:]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for key in results["reference"][1]:
        torch.testing.assert_close(results[backend][1][key], results["reference"][1][key], rtol=1e-10, atol=1e-12)
    # float64 loop, from the formula
    total, total_kl = 0.0, 0.0
    for i in range(n):
        log_ratio = float(log_probs[i] - old[i])
        if normalised:
            log_ratio = (log_ratio + float(bias[i])) * float(scale[i])
        ratio = math.exp(log_ratio)
        term = max(-float(adv[i]) * ratio, -float(adv[i]) * min(max(ratio, 0.9), 1.15))
        total += term * (float(weights[i]) if weighted else 1.0)
        if with_ref:
            delta = float(ref[i] - log_probs[i])
            total_kl += math.exp(delta) - delta - 1
    assert results["reference"][0].item() == pytest.approx(total / n + 0.3 * total_kl / n, rel=1e-12, abs=1e-12)
    if normalised:  # the bias's gradient is the policy part of log_probs' gradient
        kl_part = 0.3 * (1 - torch.exp(ref - log_probs)) / n if with_ref else 0.0
        torch.testing.assert_close(results["reference"][3], results["reference"][2] - kl_part, rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_grpo_loss_all_clipped_has_zero_gradient(backend):
    old = torch.zeros(6, device=DEVICE)
    log_probs = torch.full((6,), 0.5, requires_grad=True, device=DEVICE)
    adv = torch.ones(6, device=DEVICE)  # ratio e^0.5 > 1 + eps with positive advantage: every entry clipped
    loss, stats = ops.grpo_loss(log_probs, old, adv, clip_range=0.1, backend=backend)
    loss.backward()
    assert stats["clipfrac"].item() == 1.0 and torch.all(log_probs.grad == 0)
    assert loss.item() == pytest.approx(-1.1)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", ["step_logprob", "step_sample", "grpo_loss", "group_advantages"])
def test_opcheck(backend, op):
    cond, uncond, sample, other, alpha_t, alpha_prev = step_inputs(2, (2, 3, 3), seed=6)
    cond.requires_grad_(True)
    uncond.requires_grad_(True)
    table = reference.ddim_coefficients(alpha_t.double(), alpha_prev.double(), eta=0.9, prediction_type="epsilon")
    if op == "step_logprob":
        args = (cond, uncond, sample, other, table, 5.0, "mean", backend)
        torch.library.opcheck(ops.step_logprob_op, (*args, True))
        # without the residual (calls that need no gradient)
        torch.library.opcheck(ops.step_logprob_op, (cond.detach(), uncond.detach(), *args[2:], False))
    elif op == "step_sample":
        args = (cond, uncond, sample, other, table, 5.0, "sum", backend)
        torch.library.opcheck(ops.step_sample_op, args)
    elif op == "grpo_loss":
        log_probs, old, adv, ref = loss_inputs(9, seed=7, dtype=torch.float32)
        torch.library.opcheck(ops.grpo_loss_op, (log_probs.requires_grad_(True), old, adv, ref, None, None, None,
                                                 0.05, 0.08, 0.1, backend))
        bias, scale, weights = (t.abs() for t in loss_inputs(9, seed=8, dtype=torch.float32)[:3])
        torch.library.opcheck(ops.grpo_loss_op, (log_probs, old, adv, ref, bias.requires_grad_(True), scale,
                                                 weights, 0.05, 0.08, 0.1, backend))
    else:
        torch.library.opcheck(ops.group_advantages_op, (torch.randn(8, device=DEVICE), 4, False, True, 2.5, 1e-8,
                                                         backend))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    cond, uncond, sample, prev, alpha_t, alpha_prev = step_inputs(2, (4, 6, 6), seed=8)

    def step_loss(c, u):
        lp = ops.ddim_logprob(c, sample, prev, alpha_t, alpha_prev, uncond_output=u, guidance_scale=5.0,
                              backend=backend)
        loss, _ = ops.grpo_loss(lp, lp.detach() - 0.01, torch.tensor([1.0, -1.0], device=DEVICE), clip_range=0.1,
                                backend=backend)
        return loss

    assert_compiled_gradients_match(step_loss, (cond, uncond))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), channels=st.integers(1, 4), side=st.integers(1, 24),
       guidance=st.floats(1.0, 12.0), eta=st.floats(0.05, 1.0), step=st.floats(0.02, 0.98),
       prediction_type=st.sampled_from(["epsilon", "v_prediction"]), backend=st.sampled_from(FUSED),
       seed=st.integers(0, 2**16))
def test_fuzz_logprob_against_reference(batch, channels, side, guidance, eta, step, prediction_type, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    cond, uncond, sample, prev = (torch.randn(batch, channels, side, side, generator=gen,
                                              dtype=torch.float64).to(DEVICE) for _ in range(4))
    alpha_t = torch.full((batch,), 1.0 - step, dtype=torch.float64, device=DEVICE)
    alpha_prev = torch.clamp(alpha_t + 0.01, max=0.9999)
    kwargs = dict(eta=eta, uncond_output=uncond, guidance_scale=guidance, prediction_type=prediction_type)
    expected = reference.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, **kwargs)
    got = ops.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, backend=backend, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-6)


def test_ops_import_and_run_without_trainer_dependencies():
    """Other diffusion-RL code can use fastgrpo.ops with only torch (+ triton) installed."""
    script = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"diffusers", "transformers", "open_clip", "deepspeed", "yaml", "PIL"}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import torch
from fastgrpo import ops
x = torch.randn(2, 4, 3, 3)
alphas = torch.tensor([0.5, 0.6]), torch.tensor([0.55, 0.65])
prev, lp = ops.ddim_step(x, x, *alphas, torch.randn(2, 4, 3, 3), uncond_output=x * 0.5, guidance_scale=5.0)
loss, stats = ops.grpo_loss(lp, lp.detach(), ops.group_advantages(torch.tensor([1.0, 2.0]), 2), clip_range=0.1)
print("ok", tuple(prev.shape), sorted(stats))
"""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok (2, 4, 3, 3)")


def test_info_lists_each_op_and_reason(capsys):
    from fastgrpo.cli import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for op in ("ddim_logprob", "ddim_step", "group_advantages", "grpo_loss"):
        assert f"{op:<17} cpu   -> cpp" in out
    assert "not triton: auto picks Triton for CUDA tensors only" in out
