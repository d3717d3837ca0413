"""Triton kernels: the negative-aware fine-tuning loss (DiffusionNFT), forward and backward, one launch each.

Per row i (a (sample, draw) pair) of N elements, with guided = uncond + g (cond - uncond) (cond alone without CFG),
old the rollout policy's prediction, c_i the row's x0 scale and m = adv_clip_max:

    e+ = beta guided + (1 - beta) old - target         e- = (1 + beta) old - beta guided - target
    r_i = clamp(clamp(A_i, -m, m) / m / 2 + 1/2, 0, 1)
    w+ = max(|c_i| sum|e+| / N, 1e-5),  w- likewise     (the adaptive weights, constants for the gradient)
    term_i = m / beta (r_i c_i^2 sum(e+^2) / N / w+ + (1 - r_i) c_i^2 sum(e-^2) / N / w-)
    loss = mean(term) + kl_coef mean(sum((guided - ref)^2) / N),   deviation = mean(sum((guided - old)^2) / N)
    f+_i = m r_i c_i^2 / (w+ B),  f-_i = m (1 - r_i) c_i^2 / (w- B)

Forward: grid (B, num_chunks). Each program stores its chunk's six partial sums; the last program of a row to arrive
(an atomic counter) adds the row's partials in chunk order and writes [f+, f-] and the row's term, deviation and kl;
the last row to finish reduces every row in row order into stats = [loss, deviation, kl]. Deterministic; the
counters are those of the matching loss (zeroed buffer per (device, stream), reset by their last program).
Backward: grid (B, num_chunks), elementwise:
    d loss / d guided = grad (2 / N) (f+ e+ - f- e- + kl_coef / B (guided - ref))
    d / d cond = g d_guided (d_guided without CFG),  d / d uncond = (1 - g) d_guided
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgrpo_kernels.matching_loss import BLOCK, ROW_BLOCK, _compute, _guided, _row_chunk
from fastgrpo_kernels.step_logprob import _row_counters, _rows, launch, scalar_params, store_guided_grads

NUM_STATS = 3
NUM_SUMS = 6        # per chunk: sum e+^2, sum |e+|, sum e-^2, sum |e-|, sum (guided - old)^2, sum (guided - ref)^2
# the kernels read module globals only as constexprs (the compiler rejects plain ones; the interpreter does not)
_NUM_SUMS = tl.constexpr(NUM_SUMS)
_WEIGHT_FLOOR = tl.constexpr(1e-5)


@triton.jit
def _errors(cond_ptr, uncond_ptr, target_ptr, old_ptr, offs, mask, guidance, beta, HAS_UNCOND: tl.constexpr,
            COMPUTE: tl.constexpr):
    """(guided, guided - old, e+, e-) on one block, zero where masked."""
    guided = _guided(cond_ptr, uncond_ptr, offs, mask, guidance, HAS_UNCOND, COMPUTE)
    old = tl.load(old_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    base = old - tl.load(target_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    step = tl.where(mask, guided - old, 0.0)
    base = tl.where(mask, base, 0.0)
    return guided, step, base + beta * step, base - beta * step


@triton.jit
def _nft_fwd_kernel(
    cond_ptr, uncond_ptr, target_ptr, old_ptr, ref_ptr,   # (B, N) rows
    adv_ptr, scale_ptr,                                   # (B,)
    partial_ptr,                                          # (B, NUM_SUMS, MAX_CHUNKS)
    terms_ptr,                                            # (B, 3) scratch: term, deviation, kl
    counter_ptr,                                          # (B + 1,) int32
    rows_ptr, stats_ptr,                                  # (B, 2) [f+, f-], (NUM_STATS,)
    batch, n_elements, num_chunks, guidance, beta, adv_clip_max, kl_coef, params_ptr,
    HAS_UNCOND: tl.constexpr, HAS_REF: tl.constexpr, MAX_CHUNKS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ROW_BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr, PARAMS_IN_MEMORY: tl.constexpr,
):
    if PARAMS_IN_MEMORY:  # fp64: float arguments would be rounded to fp32
        guidance = tl.load(params_ptr)
        beta = tl.load(params_ptr + 1)
        adv_clip_max = tl.load(params_ptr + 2)
        kl_coef = tl.load(params_ptr + 3)
    row, chunk, offs, mask = _row_chunk(n_elements, BLOCK_SIZE)
    guided, step, pos, neg = _errors(cond_ptr, uncond_ptr, target_ptr, old_ptr, offs, mask, guidance, beta,
                                     HAS_UNCOND, COMPUTE)
    base = partial_ptr + row * _NUM_SUMS * MAX_CHUNKS
    tl.store(base + chunk, tl.sum(pos * pos, axis=0))
    tl.store(base + MAX_CHUNKS + chunk, tl.sum(tl.abs(pos), axis=0))
    tl.store(base + 2 * MAX_CHUNKS + chunk, tl.sum(neg * neg, axis=0))
    tl.store(base + 3 * MAX_CHUNKS + chunk, tl.sum(tl.abs(neg), axis=0))
    tl.store(base + 4 * MAX_CHUNKS + chunk, tl.sum(step * step, axis=0))
    if HAS_REF:
        drift = tl.where(mask, guided - tl.load(ref_ptr + offs, mask=mask, other=0.0).to(COMPUTE), 0.0)
        tl.store(base + 5 * MAX_CHUNKS + chunk, tl.sum(drift * drift, axis=0))
    if tl.atomic_add(counter_ptr + row, 1) == num_chunks - 1:  # last program of this row: the row's values
        idx = tl.arange(0, MAX_CHUNKS)
        valid = idx < num_chunks
        sq_pos = tl.sum(tl.load(base + idx, mask=valid, other=0.0, volatile=True), axis=0) / n_elements
        abs_pos = tl.sum(tl.load(base + MAX_CHUNKS + idx, mask=valid, other=0.0, volatile=True), axis=0) / n_elements
        sq_neg = tl.sum(tl.load(base + 2 * MAX_CHUNKS + idx, mask=valid, other=0.0, volatile=True),
                        axis=0) / n_elements
        abs_neg = tl.sum(tl.load(base + 3 * MAX_CHUNKS + idx, mask=valid, other=0.0, volatile=True),
                         axis=0) / n_elements
        deviation = tl.sum(tl.load(base + 4 * MAX_CHUNKS + idx, mask=valid, other=0.0, volatile=True),
                           axis=0) / n_elements
        kl = deviation * 0.0
        if HAS_REF:
            kl = tl.sum(tl.load(base + 5 * MAX_CHUNKS + idx, mask=valid, other=0.0, volatile=True),
                        axis=0) / n_elements
        scale = tl.load(scale_ptr + row).to(COMPUTE)
        adv = tl.minimum(tl.maximum(tl.load(adv_ptr + row).to(COMPUTE), -adv_clip_max), adv_clip_max)
        r = tl.minimum(tl.maximum(adv / adv_clip_max / 2.0 + 0.5, 0.0), 1.0)
        w_pos = tl.maximum(tl.abs(scale) * abs_pos, _WEIGHT_FLOOR)
        w_neg = tl.maximum(tl.abs(scale) * abs_neg, _WEIGHT_FLOOR)
        scale_sq = scale * scale
        term = adv_clip_max / beta * (r * scale_sq * sq_pos / w_pos + (1.0 - r) * scale_sq * sq_neg / w_neg)
        tl.store(rows_ptr + row * 2, adv_clip_max * r * scale_sq / (w_pos * batch))
        tl.store(rows_ptr + row * 2 + 1, adv_clip_max * (1.0 - r) * scale_sq / (w_neg * batch))
        terms = terms_ptr + row * 3
        tl.store(terms, term)
        tl.store(terms + 1, deviation)
        tl.store(terms + 2, kl)
        tl.store(counter_ptr + row, 0)  # every program of this row has arrived: ready for the next launch
        if tl.atomic_add(counter_ptr + batch, 1) == batch - 1:  # last row: the statistics, in row order
            rr = tl.arange(0, ROW_BLOCK_SIZE)
            loss = tl.zeros((ROW_BLOCK_SIZE,), dtype=COMPUTE)
            dev_sum = tl.zeros((ROW_BLOCK_SIZE,), dtype=COMPUTE)
            kl_sum = tl.zeros((ROW_BLOCK_SIZE,), dtype=COMPUTE)
            for start in range(0, batch, ROW_BLOCK_SIZE):
                rows = start + rr
                ok = rows < batch
                loss += tl.load(terms_ptr + rows * 3, mask=ok, other=0.0, volatile=True)
                dev_sum += tl.load(terms_ptr + rows * 3 + 1, mask=ok, other=0.0, volatile=True)
                kl_sum += tl.load(terms_ptr + rows * 3 + 2, mask=ok, other=0.0, volatile=True)
            kl_mean = tl.sum(kl_sum, axis=0) / batch
            tl.store(stats_ptr, tl.sum(loss, axis=0) / batch + kl_coef * kl_mean)
            tl.store(stats_ptr + 1, tl.sum(dev_sum, axis=0) / batch)
            tl.store(stats_ptr + 2, kl_mean)
            tl.store(counter_ptr + batch, 0)


@triton.jit
def _nft_bwd_kernel(
    grad_ptr, cond_ptr, uncond_ptr, target_ptr, old_ptr, ref_ptr, rows_ptr, grad_cond_ptr, grad_uncond_ptr,
    batch, n_elements, guidance, beta, kl_coef, params_ptr,
    HAS_UNCOND: tl.constexpr, HAS_REF: tl.constexpr, GRAD_COND: tl.constexpr, GRAD_UNCOND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr, PARAMS_IN_MEMORY: tl.constexpr,
):
    if PARAMS_IN_MEMORY:
        guidance = tl.load(params_ptr)
        beta = tl.load(params_ptr + 1)
        kl_coef = tl.load(params_ptr + 2)
    row, _, offs, mask = _row_chunk(n_elements, BLOCK_SIZE)
    factor = tl.load(grad_ptr).to(COMPUTE) * 2.0 / n_elements
    guided, _, pos, neg = _errors(cond_ptr, uncond_ptr, target_ptr, old_ptr, offs, mask, guidance, beta,
                                  HAS_UNCOND, COMPUTE)
    f_pos = factor * tl.load(rows_ptr + row * 2).to(COMPUTE)
    f_neg = factor * tl.load(rows_ptr + row * 2 + 1).to(COMPUTE)
    d_guided = f_pos * pos - f_neg * neg
    if HAS_REF:
        d_guided += factor * kl_coef / batch * (guided - tl.load(ref_ptr + offs, mask=mask, other=0.0).to(COMPUTE))
    store_guided_grads(grad_cond_ptr, grad_uncond_ptr, offs, mask, d_guided, guidance, HAS_UNCOND, GRAD_COND,
                       GRAD_UNCOND)


def nft_loss_forward(cond, uncond, target, old, ref, advantages, scale, *, guidance: float, beta: float,
                     adv_clip_max: float, kl_coef: float, compute_dtype: torch.dtype):
    """(stats (3,) [loss, deviation, kl], rows (B, 2) [f+, f-]) in compute_dtype. cond, uncond, target, old, ref:
    (B, ...) of any float dtype (uncond, ref optional); advantages, scale (B,)."""
    batch = cond.shape[0]
    cond_rows, uncond_rows, target_rows, old_rows, ref_rows = (_rows(t) for t in (cond, uncond, target, old, ref))
    n_elements = cond_rows.shape[1]
    num_chunks = triton.cdiv(n_elements, BLOCK)
    max_chunks = triton.next_power_of_2(num_chunks)
    device = cond.device
    partial = torch.empty((batch, NUM_SUMS, max_chunks), dtype=compute_dtype, device=device)
    terms = torch.empty((batch, 3), dtype=compute_dtype, device=device)
    counter = _row_counters(batch + 1, device)
    rows = torch.empty((batch, 2), dtype=compute_dtype, device=device)
    stats = torch.empty((NUM_STATS,), dtype=compute_dtype, device=device)
    params, in_memory = scalar_params([guidance, beta, adv_clip_max, kl_coef], compute_dtype, device)
    launch(_nft_fwd_kernel, (batch, num_chunks), device,
           cond_rows, uncond_rows if uncond is not None else cond_rows, target_rows, old_rows,
           ref_rows if ref is not None else cond_rows, advantages.contiguous(), scale.contiguous(), partial, terms,
           counter, rows, stats, batch, n_elements, num_chunks, float(guidance), float(beta), float(adv_clip_max),
           float(kl_coef), params if in_memory else stats,
           HAS_UNCOND=uncond is not None, HAS_REF=ref is not None, MAX_CHUNKS=max_chunks, BLOCK_SIZE=BLOCK,
           ROW_BLOCK_SIZE=ROW_BLOCK, COMPUTE=_compute(compute_dtype), PARAMS_IN_MEMORY=in_memory)
    return stats, rows


def nft_loss_backward(grad_loss, cond, uncond, target, old, ref, rows, *, guidance: float, beta: float,
                      kl_coef: float, needs: tuple[bool, bool]):
    """(d loss / d cond or None, d loss / d uncond or None) in the rows' dtype, given the upstream scalar gradient
    grad_loss (0-dim or (1,)) and the forward's rows."""
    batch = cond.shape[0]
    cond_rows, uncond_rows, target_rows, old_rows, ref_rows = (_rows(t) for t in (cond, uncond, target, old, ref))
    n_elements = cond_rows.shape[1]
    dtype = rows.dtype
    wanted = (needs[0], needs[1] and uncond is not None)
    grads = [torch.empty((batch, n_elements), dtype=dtype, device=cond.device) if w else None for w in wanted]
    params, in_memory = scalar_params([guidance, beta, kl_coef], dtype, cond.device)
    launch(_nft_bwd_kernel, (batch, triton.cdiv(n_elements, BLOCK)), cond.device,
           grad_loss.reshape(1).contiguous(), cond_rows, uncond_rows if uncond is not None else cond_rows,
           target_rows, old_rows, ref_rows if ref is not None else cond_rows, rows.contiguous(),
           *(g if g is not None else rows for g in grads), batch, n_elements, float(guidance), float(beta),
           float(kl_coef), params if in_memory else rows, HAS_UNCOND=uncond is not None, HAS_REF=ref is not None,
           GRAD_COND=wanted[0], GRAD_UNCOND=wanted[1], BLOCK_SIZE=BLOCK, COMPUTE=_compute(dtype),
           PARAMS_IN_MEMORY=in_memory)
    return tuple(g.view(cond.shape) if g is not None else None for g in grads)
