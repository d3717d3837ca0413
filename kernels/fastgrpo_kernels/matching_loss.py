"""Triton kernels: the advantage-weighted matching loss with the PPO clip (AWM), forward and backward, one launch each.

Per row i (a (sample, draw) pair) of N elements, with guided = uncond + g (cond - uncond) (cond alone without CFG):

    surrogate_i = -sum((guided - target)^2) / N            kl_i = sum((guided - ref)^2) / N      (HAS_REF)
    ratio_i     = exp(surrogate_i - old_i)                   (1 without HAS_OLD: on-policy)
    term_i      = max(-A_i ratio_i, -A_i clamp(ratio_i, 1 - c_low, 1 + c_high))
    loss        = mean(term) + kl_coef mean(kl)
    coef_i      = d loss / d surrogate_i = -A_i ratio_i / B where the unclipped term is the max, else 0

Forward: grid (B, num_chunks). Each program sums one chunk's squared errors and stores its partials; the last program
of a row to arrive (an atomic counter) adds the row's partials in chunk order and writes the row's
[surrogate, coef, kl] and its terms for the statistics; the last row to finish (a second counter) reduces every row
in row order into stats = [loss, approx_kl, clipfrac, ratio_mean, ratio_min, ratio_max, kl]. Results are therefore
deterministic; the counters live in a zeroed buffer per (device, stream) and are set back to zero by their last
program, so no launch needs a memset.
Backward: grid (B, num_chunks), elementwise:
    d loss / d guided = grad * (coef_i (-2 / N) (guided - target) + kl_coef / B (2 / N) (guided - ref))
    d / d cond = g d_guided (d_guided without CFG),  d / d uncond = (1 - g) d_guided
It recomputes guided from the inputs, so the forward stores no (B, N) tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgrpo_kernels.grpo_loss import stat_accumulators, store_stats
from fastgrpo_kernels.step_logprob import _row_counters, _rows, launch, scalar_params, store_guided_grads

BLOCK = 1024        # elements per program
ROW_BLOCK = 128     # rows per iteration of the final reduction
NUM_STATS = 7
ROW_TERMS = 4       # per row, for the statistics: term, log_ratio^2, clipped, ratio


@triton.jit
def _guided(cond_ptr, uncond_ptr, offs, mask, guidance, HAS_UNCOND: tl.constexpr, COMPUTE: tl.constexpr):
    guided = tl.load(cond_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_UNCOND:
        uncond = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        guided = uncond + guidance * (guided - uncond)
    return guided


@triton.jit
def _row_chunk(n_elements, BLOCK_SIZE: tl.constexpr):
    """(row, chunk, offsets, mask) of this program's block: grid (rows, chunks of BLOCK_SIZE elements)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return row, chunk, row.to(tl.int64) * n_elements + cols, cols < n_elements


@triton.jit
def _matching_fwd_kernel(
    cond_ptr, uncond_ptr, target_ptr, ref_ptr,       # (B, N) rows
    adv_ptr, old_ptr,                                # (B,)
    partial_ptr,                                     # (B, 2, MAX_CHUNKS): chunk sums of squared error, of drift
    terms_ptr,                                       # (B, ROW_TERMS) scratch for the statistics
    counter_ptr,                                     # (B + 1,) int32: per-row arrivals, then rows finished
    rows_ptr, stats_ptr,                             # (B, 3) [surrogate, coef, kl], (NUM_STATS,)
    batch, n_elements, num_chunks, guidance, clip_low, clip_high, kl_coef, params_ptr,
    HAS_UNCOND: tl.constexpr, HAS_REF: tl.constexpr, HAS_OLD: tl.constexpr, MAX_CHUNKS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, ROW_BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr, PARAMS_IN_MEMORY: tl.constexpr,
):
    if PARAMS_IN_MEMORY:  # fp64: float arguments would be rounded to fp32
        guidance = tl.load(params_ptr)
        clip_low = tl.load(params_ptr + 1)
        clip_high = tl.load(params_ptr + 2)
        kl_coef = tl.load(params_ptr + 3)
    row, chunk, offs, mask = _row_chunk(n_elements, BLOCK_SIZE)
    guided = _guided(cond_ptr, uncond_ptr, offs, mask, guidance, HAS_UNCOND, COMPUTE)
    diff = tl.where(mask, guided - tl.load(target_ptr + offs, mask=mask, other=0.0).to(COMPUTE), 0.0)
    base = partial_ptr + row * 2 * MAX_CHUNKS
    tl.store(base + chunk, tl.sum(diff * diff, axis=0))
    if HAS_REF:
        drift = tl.where(mask, guided - tl.load(ref_ptr + offs, mask=mask, other=0.0).to(COMPUTE), 0.0)
        tl.store(base + MAX_CHUNKS + chunk, tl.sum(drift * drift, axis=0))
    if tl.atomic_add(counter_ptr + row, 1) == num_chunks - 1:  # last program of this row: the row's values
        idx = tl.arange(0, MAX_CHUNKS)
        surrogate = -tl.sum(tl.load(base + idx, mask=idx < num_chunks, other=0.0, volatile=True), axis=0) / n_elements
        surrogate = surrogate.to(COMPUTE)
        kl = surrogate * 0.0
        if HAS_REF:
            kl = tl.sum(tl.load(base + MAX_CHUNKS + idx, mask=idx < num_chunks, other=0.0, volatile=True),
                        axis=0) / n_elements
        log_ratio = surrogate * 0.0
        if HAS_OLD:
            log_ratio = surrogate - tl.load(old_ptr + row).to(COMPUTE)
        ratio = tl.exp(log_ratio)
        adv = tl.load(adv_ptr + row).to(COMPUTE)
        low, high = 1.0 - clip_low, 1.0 + clip_high
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, low), high)
        coef = tl.where(unclipped >= clipped, unclipped / batch, 0.0)
        tl.store(rows_ptr + row * 3, surrogate)
        tl.store(rows_ptr + row * 3 + 1, coef)
        tl.store(rows_ptr + row * 3 + 2, kl)
        outside = tl.where((ratio < low) | (ratio > high), 1.0, 0.0)
        terms = terms_ptr + row * 4
        tl.store(terms, tl.maximum(unclipped, clipped))
        tl.store(terms + 1, log_ratio * log_ratio)
        tl.store(terms + 2, outside.to(COMPUTE))
        tl.store(terms + 3, ratio)
        tl.store(counter_ptr + row, 0)  # every program of this row has arrived: ready for the next launch
        if tl.atomic_add(counter_ptr + batch, 1) == batch - 1:  # last row: the statistics, in row order
            r = tl.arange(0, ROW_BLOCK_SIZE)
            loss, sq, out, ratio_sum, ratio_min, ratio_max, kl_sum = stat_accumulators(ROW_BLOCK_SIZE, COMPUTE)
            for start in range(0, batch, ROW_BLOCK_SIZE):
                rows = start + r
                valid = rows < batch
                loss += tl.load(terms_ptr + rows * 4, mask=valid, other=0.0, volatile=True)
                sq += tl.load(terms_ptr + rows * 4 + 1, mask=valid, other=0.0, volatile=True)
                out += tl.load(terms_ptr + rows * 4 + 2, mask=valid, other=0.0, volatile=True)
                ratios = tl.load(terms_ptr + rows * 4 + 3, mask=valid, other=0.0, volatile=True)
                ratio_sum += ratios
                ratio_min = tl.minimum(ratio_min, tl.where(valid, ratios, float("inf")))
                ratio_max = tl.maximum(ratio_max, tl.where(valid, ratios, float("-inf")))
                kl_sum += tl.load(rows_ptr + rows * 3 + 2, mask=valid, other=0.0, volatile=True)
            store_stats(stats_ptr, loss, sq, out, ratio_sum, ratio_min, ratio_max, kl_sum, batch, kl_coef)
            tl.store(counter_ptr + batch, 0)


@triton.jit
def _matching_bwd_kernel(
    grad_ptr, cond_ptr, uncond_ptr, target_ptr, ref_ptr, rows_ptr, grad_cond_ptr, grad_uncond_ptr,
    batch, n_elements, guidance, kl_coef, params_ptr,
    HAS_UNCOND: tl.constexpr, HAS_REF: tl.constexpr, GRAD_COND: tl.constexpr, GRAD_UNCOND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr, PARAMS_IN_MEMORY: tl.constexpr,
):
    if PARAMS_IN_MEMORY:
        guidance = tl.load(params_ptr)
        kl_coef = tl.load(params_ptr + 1)
    row, _, offs, mask = _row_chunk(n_elements, BLOCK_SIZE)
    upstream = tl.load(grad_ptr).to(COMPUTE)
    guided = _guided(cond_ptr, uncond_ptr, offs, mask, guidance, HAS_UNCOND, COMPUTE)
    f_target = upstream * tl.load(rows_ptr + row * 3 + 1).to(COMPUTE) * -2.0 / n_elements
    d_guided = f_target * (guided - tl.load(target_ptr + offs, mask=mask, other=0.0).to(COMPUTE))
    if HAS_REF:
        f_ref = upstream * kl_coef / batch * 2.0 / n_elements
        d_guided += f_ref * (guided - tl.load(ref_ptr + offs, mask=mask, other=0.0).to(COMPUTE))
    store_guided_grads(grad_cond_ptr, grad_uncond_ptr, offs, mask, d_guided, guidance, HAS_UNCOND, GRAD_COND,
                       GRAD_UNCOND)


def _compute(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def matching_loss_forward(cond, uncond, target, ref, advantages, old, *, guidance: float, clip_low: float,
                          clip_high: float, kl_coef: float, compute_dtype: torch.dtype):
    """(stats (7,), rows (B, 3) [surrogate, d loss / d surrogate, kl]) in compute_dtype. cond, uncond, target, ref:
    (B, ...) of any float dtype (uncond, ref optional); advantages, old (B,) (old optional: on-policy)."""
    batch = cond.shape[0]
    cond_rows, uncond_rows, target_rows, ref_rows = (_rows(t) for t in (cond, uncond, target, ref))
    n_elements = cond_rows.shape[1]
    num_chunks = triton.cdiv(n_elements, BLOCK)
    max_chunks = triton.next_power_of_2(num_chunks)
    device = cond.device
    partial = torch.empty((batch, 2, max_chunks), dtype=compute_dtype, device=device)
    terms = torch.empty((batch, 4), dtype=compute_dtype, device=device)
    counter = _row_counters(batch + 1, device)
    rows = torch.empty((batch, 3), dtype=compute_dtype, device=device)
    stats = torch.empty((NUM_STATS,), dtype=compute_dtype, device=device)
    params, in_memory = scalar_params([guidance, clip_low, clip_high, kl_coef], compute_dtype, device)
    adv = advantages.contiguous()
    launch(_matching_fwd_kernel, (batch, num_chunks), device,
           cond_rows, uncond_rows if uncond is not None else cond_rows, target_rows,
           ref_rows if ref is not None else cond_rows, adv, old.contiguous() if old is not None else adv,
           partial, terms, counter, rows, stats, batch, n_elements, num_chunks, float(guidance), float(clip_low),
           float(clip_high), float(kl_coef), params if in_memory else stats,
           HAS_UNCOND=uncond is not None, HAS_REF=ref is not None, HAS_OLD=old is not None, MAX_CHUNKS=max_chunks,
           BLOCK_SIZE=BLOCK, ROW_BLOCK_SIZE=ROW_BLOCK, COMPUTE=_compute(compute_dtype), PARAMS_IN_MEMORY=in_memory)
    return stats, rows


def matching_loss_backward(grad_loss, cond, uncond, target, ref, rows, *, guidance: float, kl_coef: float,
                           needs: tuple[bool, bool]):
    """(d loss / d cond or None, d loss / d uncond or None) in the rows' dtype, given the upstream scalar gradient
    grad_loss (0-dim or (1,)) and the forward's rows."""
    batch = cond.shape[0]
    cond_rows, uncond_rows, target_rows, ref_rows = (_rows(t) for t in (cond, uncond, target, ref))
    n_elements = cond_rows.shape[1]
    dtype = rows.dtype
    wanted = (needs[0], needs[1] and uncond is not None)
    grads = [torch.empty((batch, n_elements), dtype=dtype, device=cond.device) if w else None for w in wanted]
    params, in_memory = scalar_params([guidance, kl_coef], dtype, cond.device)
    launch(_matching_bwd_kernel, (batch, triton.cdiv(n_elements, BLOCK)), cond.device,
           grad_loss.reshape(1).contiguous(), cond_rows, uncond_rows if uncond is not None else cond_rows,
           target_rows, ref_rows if ref is not None else cond_rows, rows.contiguous(),
           *(g if g is not None else rows for g in grads), batch, n_elements, float(guidance), float(kl_coef),
           params if in_memory else rows, HAS_UNCOND=uncond is not None, HAS_REF=ref is not None,
           GRAD_COND=wanted[0], GRAD_UNCOND=wanted[1], BLOCK_SIZE=BLOCK, COMPUTE=_compute(dtype),
           PARAMS_IN_MEMORY=in_memory)
    return tuple(g.view(cond.shape) if g is not None else None for g in grads)
