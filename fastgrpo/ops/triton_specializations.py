"""Every Triton kernel specialisation the ops can launch, compiled for real GPUs on a machine without one.

The interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) accepts code that the Triton compiler
rejects, so passing kernel tests say nothing about CUDA. This module drives `fastgrpo.ops` with backend='triton'
through every option the ops expose (CFG or not, sampling step or log-prob, with or without a residual, DDIM with
epsilon or v prediction and the flow-matching SDE, each subset of gradients, fp32/bf16/fp16/fp64 inputs, several row lengths; advantages with group or
global std, biased or not, clipped or not; the loss with or without a reference, ratio normalisation and
weights; the matching and NFT losses with or without CFG, a reference and (matching) old surrogates) on CPU tensors, with each kernel's
launch replaced by a recorder. Each recorded launch is specialised the way Triton's own launcher does it (its
binder: argument types, 16-byte alignment and divisibility, constexprs) and compiled with `triton.compile` for a
`GPUTarget`. ptxas's resource report (cuobjdump) gives registers, local memory (spills) and static shared memory.

    python -m fastgrpo.ops.triton_specializations [--arch 80,90] [--json FILE] [--jobs N]

Run it with TRITON_INTERPRET unset: the kernels must be JIT functions, not interpreted ones.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (batch, latent shape): one chunk (num_chunks == 1 is specialised), 5 chunks (length not divisible by 16); every
# dtype and flag is compiled at these. SD 64x64 latents (16 chunks) and SDXL 128x128 (64) in the dtypes trainers use.
ROW_SHAPES = ((2, (4, 8, 8)), (3, (3, 37, 41)))
LARGE_ROW_SHAPES = ((2, (4, 64, 64)), (1, (4, 128, 128)))
LARGE_DTYPES = (torch.float32, torch.bfloat16)
GROUP_SIZES = (2, 16, 64)


@dataclass(frozen=True)
class Launch:
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, self.constexprs, self.attrs], sort_keys=True, default=str)


def _jit_kernels():
    """{name: JITFunction} of every kernel the launchers start (not the helpers they call)."""
    import importlib

    import triton

    kernels = {}
    for module in ("step_logprob", "group_advantages", "grpo_loss", "matching_loss", "nft_loss"):  # the package exports functions of these names
        for name, value in vars(importlib.import_module(f"fastgrpo_kernels.{module}")).items():
            if name.endswith("_kernel"):
                if not isinstance(value, triton.runtime.jit.JITFunction):
                    raise RuntimeError(f"{name} is {type(value).__name__}, not a JIT function: unset TRITON_INTERPRET "
                                       "before triton is imported")
                kernels[name] = value
    return kernels


@contextlib.contextmanager
def recording(target):
    """Replace each kernel's launch with one that records (kernel name, signature, constexprs, attrs) as Triton's
    launcher would specialise it for `target`, and launches nothing. Yields the list of records."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    launches: list[Launch] = []
    kernels = _jit_kernels()

    def recorder(name, fn):
        binder = create_function_from_signature(fn.signature, fn.params, backend)

        def run(*args, grid, warmup, **kwargs):
            bound, specialization, options = binder(*args, **kwargs)
            _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            names = [p.name for p in fn.params]
            launches.append(Launch(name, signature, {names[path[0]]: _plain(value) for path, value in
                                                     constexprs.items()},
                                   {names[path[0]]: value for path, value in attrs.items()}))
        return run

    saved = {name: fn.__dict__.get("run") for name, fn in kernels.items()}
    for name, fn in kernels.items():
        fn.run = recorder(name, fn)
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # lets ops.select_backend hand CPU tensors to 'triton'; nothing runs
    try:
        yield launches
    finally:
        for name, fn in kernels.items():
            if saved[name] is None:
                del fn.run
            else:
                fn.run = saved[name]
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def _plain(value):
    """A constexpr as JSON can hold it (a triton dtype by its name)."""
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def _step_inputs(batch, shape, dtype, with_uncond, requires):
    def tensor(flag=False):
        return torch.randn(batch, *shape).to(dtype).requires_grad_(bool(flag))

    cond, uncond, sample, other = tensor(requires[0]), tensor(requires[1]), tensor(requires[2]), tensor(requires[3])
    alpha_t = torch.full((batch,), 0.5, dtype=dtype)
    return cond, uncond if with_uncond else None, sample, other, alpha_t, alpha_t + 0.2


def exercise_steps(dtypes=DTYPES, row_shapes=ROW_SHAPES) -> None:
    """Call the step ops once for every option combination (forward, sampling step, backward per gradient subset).
    DDIM and the flow SDE share the kernels (the sampler is in the step table, not in the code), so the flow ops
    add no specialisation; they are exercised to prove it."""
    from fastgrpo import ops

    for dtype, (batch, shape), with_uncond, sampler in itertools.product(
            dtypes, row_shapes, (True, False), ("epsilon", "v_prediction", "flow")):
        full_cross = (batch, shape) == row_shapes[0]  # gradient subsets need no more than one row length
        if sampler == "flow":
            step, logprob = ops.flow_sde_step, ops.flow_sde_logprob
            settings = dict(noise_level=0.7, sigma_max=0.9, guidance_scale=5.0, backend="triton")
        else:
            step, logprob = ops.ddim_step, ops.ddim_logprob
            settings = dict(eta=1.0, guidance_scale=5.0, prediction_type=sampler, backend="triton")
        # (0.5, 0.7): alpha_prod_t < alpha_prod_t_prev for DDIM; reversed, sigma > sigma_prev for the flow
        order = (1, 0) if sampler == "flow" else (0, 1)
        cond, uncond, sample, noise, *schedule = _step_inputs(batch, shape, dtype, with_uncond, (False,) * 4)
        step(cond, sample, *(schedule[k] for k in order), noise, uncond_output=uncond, **settings)
        logprob(cond, sample, noise, *(schedule[k] for k in order), uncond_output=uncond, **settings)
        subsets = [s for s in itertools.product((False, True), repeat=4) if any(s) and (with_uncond or not s[1])]
        for requires in subsets if full_cross else [(True, with_uncond, False, False)]:
            cond, uncond, sample, prev, *schedule = _step_inputs(batch, shape, dtype, with_uncond, requires)
            logprob(cond, sample, prev, *(schedule[k] for k in order), uncond_output=uncond,
                    **settings).sum().backward()


def exercise_grpo(dtypes=DTYPES, group_sizes=GROUP_SIZES) -> None:
    """Call group_advantages and grpo_loss (forward and backward) once for every option combination."""
    from fastgrpo import ops

    for dtype, group_size in itertools.product(dtypes, group_sizes):
        rewards = torch.rand(group_size * 3).to(dtype)
        for std, unbiased, clip in itertools.product(("group", "global"), (True, False), (None, 2.5)):
            ops.group_advantages(rewards, group_size, std=std, unbiased=unbiased, clip=clip, backend="triton")
    # the loss: with or without a reference, RatioNorm (bias + scale) and weights; two lengths (divisible by 16 or
    # not) without the variants, the longer one with them
    for dtype, with_ref, normalised, weighted in itertools.product(dtypes, (False, True), (False, True),
                                                                   (False, True)):
        for n in (48, 3000) if not (normalised or weighted) else (3000,):
            def vector():
                return torch.randn(n).to(dtype)

            log_probs = vector().requires_grad_(True)
            bias = vector().requires_grad_(True) if normalised else None
            loss, _ = ops.grpo_loss(log_probs, vector(), vector(), clip_range=0.2, kl_coef=0.1 if with_ref else 0.0,
                                    ref_log_probs=vector() if with_ref else None, ratio_bias=bias,
                                    ratio_scale=vector().abs() if normalised else None,
                                    weights=vector().abs() if weighted else None, backend="triton")
            loss.backward()


def exercise_matching(dtypes=DTYPES, row_shapes=ROW_SHAPES) -> None:
    """Call matching_loss (forward, and backward per gradient subset) once for every option combination."""
    from fastgrpo import ops

    for dtype, (batch, shape), with_uncond, with_ref, with_old in itertools.product(
            dtypes, row_shapes, (False, True), (False, True), (False, True)):
        subsets = [(True, False), (False, True), (True, True)] if with_uncond else [(True, False)]
        for needs in subsets:
            def tensor(flag=False):
                return torch.randn(batch, *shape).to(dtype).requires_grad_(flag)

            cond, uncond = tensor(needs[0]), tensor(needs[1]) if with_uncond else None
            loss, _, _ = ops.matching_loss(cond, tensor(), torch.randn(batch).to(dtype), clip_range=0.2,
                                           old_surrogates=-torch.rand(batch).to(dtype) if with_old else None,
                                           uncond_prediction=uncond, guidance_scale=4.0,
                                           reference_prediction=tensor() if with_ref else None,
                                           kl_coef=0.1 if with_ref else 0.0, backend="triton")
            loss.backward()


def exercise_nft(dtypes=DTYPES, row_shapes=ROW_SHAPES) -> None:
    """Call nft_loss (forward, and backward per gradient subset) once for every option combination."""
    from fastgrpo import ops

    for dtype, (batch, shape), with_uncond, with_ref in itertools.product(
            dtypes, row_shapes, (False, True), (False, True)):
        subsets = [(True, False), (False, True), (True, True)] if with_uncond else [(True, False)]
        for needs in subsets:
            def tensor(flag=False):
                return torch.randn(batch, *shape).to(dtype).requires_grad_(flag)

            cond, uncond = tensor(needs[0]), tensor(needs[1]) if with_uncond else None
            loss, _ = ops.nft_loss(cond, tensor(), tensor(), torch.randn(batch).to(dtype),
                                   torch.rand(batch).to(dtype), beta=0.5, uncond_prediction=uncond,
                                   guidance_scale=4.0, reference_prediction=tensor() if with_ref else None,
                                   kl_coef=0.1 if with_ref else 0.0, backend="triton")
            loss.backward()


def launches(target) -> list[Launch]:
    """The distinct specialisations the ops launch, in first-launch order."""
    with recording(target) as recorded:
        exercise_steps()
        exercise_steps(LARGE_DTYPES, LARGE_ROW_SHAPES)
        exercise_grpo()
        exercise_matching()
        exercise_matching(LARGE_DTYPES, LARGE_ROW_SHAPES)
        exercise_nft()
        exercise_nft(LARGE_DTYPES, LARGE_ROW_SHAPES)
    return list({launch.key(): launch for launch in recorded}.values())


@dataclass
class Compiled:
    kernel: str
    arch: int
    constexprs: dict
    signature: dict
    registers: int | None = None
    local_bytes: int | None = None       # local memory per thread: spills (and stack arrays)
    static_shared_bytes: int | None = None
    shared_bytes: int | None = None      # dynamic shared memory Triton requests at launch
    seconds: float = 0.0
    error: str | None = None


def _resource_usage(cubin: bytes) -> dict:
    from triton.backends.nvidia import compiler as nvidia

    tool = os.path.join(os.path.dirname(nvidia.get_ptxas(90).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True,
                                check=True).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", report.split("Function", 1)[-1]))
    return {"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]),
            "static_shared_bytes": int(fields["SHARED"])}


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile one specialisation for sm_{arch}; a compiler error is recorded, not raised."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_kernels()[launch.kernel]
    dtypes = {str(d): d for d in (tl.float32, tl.float64, tl.float16, tl.bfloat16)}
    constexprs = {(fn.arg_names.index(k),): dtypes.get(v, v) if isinstance(v, str) else v
                  for k, v in launch.constexprs.items()}
    attrs = {(fn.arg_names.index(k),): v for k, v in launch.attrs.items()}
    result = Compiled(launch.kernel, arch, launch.constexprs, launch.signature)
    start = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, launch.signature, constexprs, attrs),
                                target=GPUTarget("cuda", arch, 32))
        result.shared_bytes = kernel.metadata.shared
        for name, value in _resource_usage(kernel.asm["cubin"]).items():
            setattr(result, name, value)
    except Exception as error:  # noqa: BLE001 - every failure is reported with its specialisation
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    result.seconds = time.perf_counter() - start
    return result


def _compile_star(job):
    return compile_launch(*job)


def compile_all(archs=(80, 90), jobs: int = 1) -> list[Compiled]:
    from triton.backends.compiler import GPUTarget

    work = [(launch, arch) for arch in archs for launch in launches(GPUTarget("cuda", arch, 32))]
    if jobs <= 1:
        return [compile_launch(*job) for job in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_star, work, chunksize=4))


def summary(results: list[Compiled]) -> str:
    """A markdown table per (kernel, arch): specialisations, register and shared-memory range, spills, errors."""
    lines = ["| kernel | arch | specialisations | registers | local bytes (spills) | shared bytes | errors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (kernel, arch), group in itertools.groupby(sorted(results, key=lambda r: (r.kernel, r.arch)),
                                                   key=lambda r: (r.kernel, r.arch)):
        group = list(group)
        ok = [r for r in group if r.error is None]
        regs = sorted({r.registers for r in ok})
        local = max((r.local_bytes for r in ok), default=0)
        shared = max((max(r.shared_bytes, r.static_shared_bytes) for r in ok), default=0)
        lines.append(f"| {kernel} | sm_{arch} | {len(group)} | {regs[0] if regs else '-'}-{regs[-1] if regs else '-'}"
                     f" | max {local} | max {shared} | {len(group) - len(ok)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgrpo.ops.triton_specializations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities, e.g. 80,90")
    parser.add_argument("--json", help="write every specialisation's result here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        print(f"error: --arch must be comma-separated integers, got {args.arch!r}", file=sys.stderr)
        return 2
    results = compile_all(archs, args.jobs)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([asdict(r) for r in results], handle, indent=1)
    print(summary(results))
    failed = [r for r in results if r.error is not None]
    for r in failed:
        print(f"FAILED {r.kernel} sm_{r.arch} {r.constexprs}: {r.error}", file=sys.stderr)
    print(f"{len(results) - len(failed)} compiled, {len(failed)} failed "
          f"({sum(r.seconds for r in results):.0f} s of compiling)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
