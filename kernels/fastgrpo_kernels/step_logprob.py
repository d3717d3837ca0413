"""Triton kernels: per-sample Gaussian log-prob of a stochastic sampler step, classifier-free guidance folded in.

Each program reads its sample's row of the step table (`fastgrpo.ops.reference`, "sampler step coefficients":
coef_x, coef_e, noise_std, precision, log_norm; DDIM and the flow-matching SDE both fill it), so

    guided = uncond + g * (cond - uncond)            (cond alone without CFG)
    mean   = coef_x * x_t + coef_e * guided
    prev   = mean + noise_std * noise                 (sampling variant only; stored in the compute dtype)
    logp   = -scale * precision * sum((prev - mean)^2) + log_norm * count

with scale = 1/N, count = 1 (mean over C*H*W) or scale = 1, count = N (sum).

Forward: grid (B, num_chunks). Each program squares and sums one chunk of a row and stores the partial; the last
program of a row to finish (an atomic counter) sums that row's partials in a fixed order, so the result is
deterministic and there is one launch: the partials need no zeroing (only written slots are read), and the
counters live in a zeroed buffer per (device, stream) that the last program of each row sets back to zero.
When a gradient is needed the forward also stores the residual r = prev - mean. Every gradient is a per-sample
multiple of r (d logp / d mean = grad_out * scale * 2 precision * r), so the backward is one elementwise launch
that reads r alone and writes the requested gradients.
Offsets are int64; nothing is written in place.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program; fixed (tuning script: bench/tune_triton.py)


@triton.jit
def _row_coefficients(table_ptr, row, COMPUTE: tl.constexpr):
    """(coef_x, coef_e, noise_std, precision, log_norm) of sample `row`, from the (B, 5) float64 step table."""
    base = table_ptr + row * 5
    return (tl.load(base).to(COMPUTE), tl.load(base + 1).to(COMPUTE), tl.load(base + 2).to(COMPUTE),
            tl.load(base + 3).to(COMPUTE), tl.load(base + 4).to(COMPUTE))


@triton.jit
def _load_mean(cond_ptr, uncond_ptr, sample_ptr, offs, mask, coef_x, coef_e, guidance, HAS_UNCOND: tl.constexpr,
               COMPUTE: tl.constexpr):
    """mean = coef_x * x_t + coef_e * guided for one block, guided = uncond + g * (cond - uncond)."""
    guided = tl.load(cond_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_UNCOND:
        uncond = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        guided = uncond + guidance * (guided - uncond)
    return coef_x * tl.load(sample_ptr + offs, mask=mask, other=0.0).to(COMPUTE) + coef_e * guided


@triton.jit
def _step_logprob_fwd_kernel(
    cond_ptr, uncond_ptr, sample_ptr, target_ptr, prev_out_ptr,  # (B, N) rows; target = prev_sample or noise
    residual_ptr,                                                 # (B, N): prev - mean, when SAVE_RESIDUAL
    table_ptr,                                                    # (B, 5) float64 step table
    partial_ptr, counter_ptr, out_ptr,                            # (B, MAX_CHUNKS), (B,) int32, (B,)
    n_elements, num_chunks, guidance, scale, count, params_ptr,
    HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, SAVE_RESIDUAL: tl.constexpr, MAX_CHUNKS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr, PARAMS_IN_MEMORY: tl.constexpr,
):
    if PARAMS_IN_MEMORY:  # fp64: float arguments would be rounded to fp32
        guidance = tl.load(params_ptr)
        scale = tl.load(params_ptr + 1)
    row = tl.program_id(0)
    coef_x, coef_e, std, precision, log_norm = _row_coefficients(table_ptr, row, COMPUTE)
    chunk = tl.program_id(1)
    cols = chunk.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_elements
    offs = row.to(tl.int64) * n_elements + cols
    mean = _load_mean(cond_ptr, uncond_ptr, sample_ptr, offs, mask, coef_x, coef_e, guidance, HAS_UNCOND, COMPUTE)
    target = tl.load(target_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_NOISE:
        prev = mean + std * target
        tl.store(prev_out_ptr + offs, prev, mask=mask)  # stored in the compute dtype: logp sees this exact value
    else:
        prev = target
    diff = tl.where(mask, prev - mean, 0.0)
    if SAVE_RESIDUAL:
        tl.store(residual_ptr + offs, diff, mask=mask)
    tl.store(partial_ptr + row * MAX_CHUNKS + chunk, tl.sum(diff * diff, axis=0))
    finished = tl.atomic_add(counter_ptr + row, 1)
    if finished == num_chunks - 1:  # last program of this row: reduce the partials in chunk order
        idx = tl.arange(0, MAX_CHUNKS)
        partials = tl.load(partial_ptr + row * MAX_CHUNKS + idx, mask=idx < num_chunks, other=0.0, volatile=True)
        total = tl.sum(partials, axis=0)
        tl.store(out_ptr + row, -scale * precision * total + log_norm * count)
        tl.store(counter_ptr + row, 0)  # every program of this row has arrived: ready for the next launch


@triton.jit
def store_guided_grads(grad_cond_ptr, grad_uncond_ptr, offs, mask, d_guided, guidance, HAS_UNCOND: tl.constexpr,
                       GRAD_COND: tl.constexpr, GRAD_UNCOND: tl.constexpr):
    """Store d/d cond and d/d uncond of guided = uncond + g (cond - uncond) (guided = cond without CFG)."""
    if GRAD_COND:
        if HAS_UNCOND:
            tl.store(grad_cond_ptr + offs, guidance * d_guided, mask=mask)
        else:
            tl.store(grad_cond_ptr + offs, d_guided, mask=mask)
    if GRAD_UNCOND:
        tl.store(grad_uncond_ptr + offs, (1.0 - guidance) * d_guided, mask=mask)


@triton.jit
def _step_logprob_bwd_kernel(
    grad_out_ptr, residual_ptr, table_ptr,
    grad_cond_ptr, grad_uncond_ptr, grad_sample_ptr, grad_prev_ptr,
    grad_out_stride, n_elements, guidance, scale, params_ptr,
    HAS_UNCOND: tl.constexpr, GRAD_COND: tl.constexpr, GRAD_UNCOND: tl.constexpr, GRAD_SAMPLE: tl.constexpr,
    GRAD_PREV: tl.constexpr, BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr,
    PARAMS_IN_MEMORY: tl.constexpr,
):
    if PARAMS_IN_MEMORY:
        guidance = tl.load(params_ptr)
        scale = tl.load(params_ptr + 1)
    row = tl.program_id(0)
    coef_x, coef_e, _, precision, _ = _row_coefficients(table_ptr, row, COMPUTE)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_elements
    offs = row.to(tl.int64) * n_elements + cols
    # d logp / d mean = grad_out * scale * 2 precision * (prev - mean)
    factor = tl.load(grad_out_ptr + row * grad_out_stride).to(COMPUTE) * scale * 2.0 * precision
    d_mean = factor * tl.load(residual_ptr + offs, mask=mask)
    store_guided_grads(grad_cond_ptr, grad_uncond_ptr, offs, mask, d_mean * coef_e, guidance, HAS_UNCOND, GRAD_COND,
                       GRAD_UNCOND)
    if GRAD_SAMPLE:
        tl.store(grad_sample_ptr + offs, d_mean * coef_x, mask=mask)
    if GRAD_PREV:
        tl.store(grad_prev_ptr + offs, -d_mean, mask=mask)


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def scalar_params(values, dtype: torch.dtype, device) -> tuple[torch.Tensor | None, bool]:
    """Triton passes Python floats as fp32; in fp64 the hyperparameters travel in a small tensor instead.
    (fp32 calls pass plain floats, so sampling loops make no host-to-device copies.)"""
    if dtype != torch.float64:
        return None, False
    return torch.tensor(values, dtype=dtype, device=device), True


def on_device(device: torch.device):
    """Triton launches on the current CUDA device, whatever the tensors' device: make theirs current for the launch.
    A no-op when it already is (the trainer makes each rank's GPU current) and for CPU tensors (the interpreter)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) with `device` current."""
    with on_device(device):
        kernel[grid](*args, **kwargs)


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _row_counters(batch: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 arrival counters for `batch` rows, one buffer per (device, stream): launches on a stream run in
    order and each leaves its counters at zero, so no call pays a memset launch. A larger batch replaces the
    buffer (the caching allocator orders the old one's reuse after the kernels already queued on the stream)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counters = _COUNTERS.get((device, stream))
    if counters is None or counters.numel() < batch:
        counters = torch.zeros((max(batch, 64),), dtype=torch.int32, device=device)
        _COUNTERS[(device, stream)] = counters
    return counters


def _table(table: torch.Tensor, batch: int) -> torch.Tensor:
    if table.shape != (batch, 5) or table.dtype != torch.float64:
        raise ValueError(f"the step table must be ({batch}, 5) float64, got {tuple(table.shape)} {table.dtype}")
    return table.contiguous()


def _rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.reshape(tensor.shape[0], -1).contiguous()


def step_logprob_forward(cond, uncond, sample, target, table, *, guidance: float, sum_reduction: bool,
                         has_noise: bool, compute_dtype: torch.dtype, save_residual: bool = False):
    """Launch the forward. Tensors (B, ...) of any float dtype; table (B, 5) float64. target is prev_sample, or the noise
    when has_noise. Returns (log_prob (B,), prev_sample or None, residual prev - mean or None), all in
    compute_dtype; the residual (for the backward) only when save_residual, which the sampling variant does not take."""
    if has_noise and save_residual:
        raise ValueError("step_logprob_forward: the sampling variant saves no residual")
    batch = cond.shape[0]
    cond_rows, uncond_rows, sample_rows, target_rows = (_rows(t) for t in (cond, uncond, sample, target))
    n_elements = cond_rows.shape[1]
    num_chunks = triton.cdiv(n_elements, BLOCK)
    max_chunks = triton.next_power_of_2(num_chunks)
    partial = torch.empty((batch, max_chunks), dtype=compute_dtype, device=cond.device)
    counter = _row_counters(batch, cond.device)
    out = torch.empty((batch,), dtype=compute_dtype, device=cond.device)

    def rows_or_none(flag):
        return torch.empty((batch, n_elements), dtype=compute_dtype, device=cond.device) if flag else None

    prev_out, residual = rows_or_none(has_noise), rows_or_none(save_residual)
    scale = 1.0 if sum_reduction else 1.0 / n_elements
    count = float(n_elements) if sum_reduction else 1.0
    params, in_memory = scalar_params([guidance, scale], compute_dtype, cond.device)
    launch(_step_logprob_fwd_kernel, (batch, num_chunks), cond.device,
        cond_rows, uncond_rows if uncond_rows is not None else cond_rows, sample_rows, target_rows,
        prev_out if prev_out is not None else out, residual if residual is not None else out,
        _table(table, batch), partial, counter, out, n_elements, num_chunks,
        float(guidance), scale, count, params if in_memory else out,
        HAS_UNCOND=uncond is not None, HAS_NOISE=has_noise, SAVE_RESIDUAL=save_residual,
        MAX_CHUNKS=max_chunks, BLOCK_SIZE=BLOCK, COMPUTE=_compute_dtype(compute_dtype), PARAMS_IN_MEMORY=in_memory)
    return out, *(t.view(cond.shape) if t is not None else None for t in (prev_out, residual))


def step_logprob_backward(grad_out, residual, table, *, guidance: float, sum_reduction: bool, has_uncond: bool,
                          needs: tuple[bool, bool, bool, bool]):
    """Gradients of the log-prob with respect to (cond, uncond, sample, prev) from the forward's residual, in the
    residual's dtype; None where `needs` is False (uncond also without CFG). grad_out: (B,); table (B, 5) float64."""
    batch = residual.shape[0]
    residual_rows = _rows(residual)
    n_elements = residual_rows.shape[1]
    wanted = [needs[0], needs[1] and has_uncond, needs[2], needs[3]]
    grads = [torch.empty_like(residual_rows) if flag else None for flag in wanted]
    placeholder = residual_rows
    scale = 1.0 if sum_reduction else 1.0 / n_elements
    params, in_memory = scalar_params([guidance, scale], residual.dtype, residual.device)
    # grad_out is read with its stride: the backward of a sum passes an expanded scalar (a copy would be a launch)
    launch(_step_logprob_bwd_kernel, (batch, triton.cdiv(n_elements, BLOCK)), residual.device,
        grad_out, residual_rows, _table(table, batch),
        *(g if g is not None else placeholder for g in grads), grad_out.stride(0), n_elements, float(guidance),
        scale, params if in_memory else placeholder, HAS_UNCOND=has_uncond, GRAD_COND=wanted[0],
        GRAD_UNCOND=wanted[1], GRAD_SAMPLE=wanted[2], GRAD_PREV=wanted[3], BLOCK_SIZE=BLOCK,
        COMPUTE=_compute_dtype(residual.dtype), PARAMS_IN_MEMORY=in_memory)
    return tuple(g.view(residual.shape) if g is not None else None for g in grads)
