"""The Triton kernels compile for real GPUs (sm_80, sm_90), not only under the interpreter.

`fastgrpo.ops.triton_specializations` records every launch the ops make for each option combination, specialises it
as Triton's launcher would, and compiles it with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`.
It runs in a subprocess because this test session imports triton with TRITON_INTERPRET=1 (the kernels are then
interpreted functions, which cannot be compiled).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile") / "specializations.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fastgrpo.ops.triton_specializations", "--arch", "80,90",
                             "--json", str(out), "--jobs", "2"], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=1800)
    assert out.is_file(), (result.stdout + result.stderr)[-4000:]
    records = json.loads(out.read_text())
    failures = [f"{r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['error']}" for r in records if r["error"]]
    assert not failures, "\n".join(failures[:10])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return records


def _of(records, kernel, arch):
    return [r for r in records if r["kernel"] == kernel and r["arch"] == arch]


@pytest.mark.parametrize("arch", [80, 90])
def test_every_logprob_specialisation_compiles(compiled, arch):
    forward = _of(compiled, "_step_logprob_fwd_kernel", arch)
    seen = {(r["signature"]["cond_ptr"], r["constexprs"]["COMPUTE"], r["constexprs"]["HAS_UNCOND"],
             r["constexprs"]["HAS_NOISE"], r["constexprs"]["SAVE_RESIDUAL"]) for r in forward}
    modes = [(True, False), (False, False), (False, True)]  # sampling step; log-prob; log-prob saving the residual
    for pointer, uncond, (noise, residual) in itertools.product(("*fp32", "*bf16", "*fp16", "*fp64"), (True, False),
                                                                modes):
        compute = "fp64" if pointer == "*fp64" else "fp32"
        assert (pointer, compute, uncond, noise, residual) in seen
    # the step table (DDIM and flow SDE alike) is always float64
    assert {r["signature"]["table_ptr"] for r in forward} == {"*fp64"}
    # one chunk (num_chunks specialised to 1), 5 chunks, SD 64x64 (16) and SDXL 128x128 (64 chunks) per row
    assert {r["constexprs"]["MAX_CHUNKS"] for r in forward} >= {1, 8, 16, 64}

    backward = _of(compiled, "_step_logprob_bwd_kernel", arch)
    flags = ("GRAD_COND", "GRAD_UNCOND", "GRAD_SAMPLE", "GRAD_PREV")
    subsets = {(r["constexprs"]["HAS_UNCOND"], r["constexprs"]["COMPUTE"], *(r["constexprs"][f] for f in flags))
               for r in backward}
    for uncond, compute, wanted in itertools.product((True, False), ("fp32", "fp64"),
                                                     itertools.product((False, True), repeat=4)):
        if any(wanted) and (uncond or not wanted[1]):
            assert (uncond, compute, *wanted) in subsets
    assert {r["signature"]["residual_ptr"] for r in backward} == {"*fp32", "*fp64"}
    assert {r["signature"]["table_ptr"] for r in backward} == {"*fp64"}


@pytest.mark.parametrize("arch", [80, 90])
def test_every_advantage_and_loss_specialisation_compiles(compiled, arch):
    advantages = _of(compiled, "_group_advantages_kernel", arch)
    seen = {(r["constexprs"]["UNBIASED"], r["constexprs"]["GLOBAL_STD"], r["constexprs"]["HAS_CLIP"],
             r["constexprs"]["COMPUTE"]) for r in advantages}
    assert seen == set(itertools.product((True, False), (True, False), (True, False), ("fp32", "fp64")))
    assert {r["signature"]["rewards_ptr"] for r in advantages} == {"*fp32", "*bf16", "*fp16", "*fp64"}
    for kernel in ("_grpo_loss_fwd_kernel", "_grpo_loss_bwd_kernel"):
        loss = _of(compiled, kernel, arch)
        assert {(r["signature"]["logp_ptr"], r["constexprs"]["HAS_REF"], r["constexprs"]["NORMALISED"],
                 r["constexprs"]["HAS_WEIGHT"]) for r in loss} == set(
            itertools.product(("*fp32", "*bf16", "*fp16", "*fp64"), (True, False), (True, False), (True, False)))


@pytest.mark.parametrize("arch", [80, 90])
def test_every_matching_loss_specialisation_compiles(compiled, arch):
    forward = _of(compiled, "_matching_fwd_kernel", arch)
    seen = {(r["signature"]["cond_ptr"], r["constexprs"]["COMPUTE"], r["constexprs"]["HAS_UNCOND"],
             r["constexprs"]["HAS_REF"], r["constexprs"]["HAS_OLD"]) for r in forward}
    for pointer, uncond, ref, old in itertools.product(("*fp32", "*bf16", "*fp16", "*fp64"), (True, False),
                                                       (True, False), (True, False)):
        assert (pointer, "fp64" if pointer == "*fp64" else "fp32", uncond, ref, old) in seen
    # one chunk, 5 chunks, SD 64x64 (16) and SDXL 128x128 (64 chunks) per row
    assert {r["constexprs"]["MAX_CHUNKS"] for r in forward} >= {1, 8, 16, 64}
    backward = _of(compiled, "_matching_bwd_kernel", arch)
    subsets = {(r["constexprs"]["HAS_UNCOND"], r["constexprs"]["HAS_REF"], r["constexprs"]["COMPUTE"],
                r["constexprs"]["GRAD_COND"], r["constexprs"]["GRAD_UNCOND"]) for r in backward}
    for uncond, ref, compute in itertools.product((True, False), (True, False), ("fp32", "fp64")):
        for wanted in ([(True, False), (False, True), (True, True)] if uncond else [(True, False)]):
            assert (uncond, ref, compute, *wanted) in subsets


@pytest.mark.parametrize("arch", [80, 90])
def test_every_nft_loss_specialisation_compiles(compiled, arch):
    forward = _of(compiled, "_nft_fwd_kernel", arch)
    seen = {(r["signature"]["cond_ptr"], r["constexprs"]["COMPUTE"], r["constexprs"]["HAS_UNCOND"],
             r["constexprs"]["HAS_REF"]) for r in forward}
    for pointer, uncond, ref in itertools.product(("*fp32", "*bf16", "*fp16", "*fp64"), (True, False),
                                                  (True, False)):
        assert (pointer, "fp64" if pointer == "*fp64" else "fp32", uncond, ref) in seen
    assert {r["constexprs"]["MAX_CHUNKS"] for r in forward} >= {1, 8, 16, 64}
    backward = _of(compiled, "_nft_bwd_kernel", arch)
    subsets = {(r["constexprs"]["HAS_UNCOND"], r["constexprs"]["HAS_REF"], r["constexprs"]["COMPUTE"],
                r["constexprs"]["GRAD_COND"], r["constexprs"]["GRAD_UNCOND"]) for r in backward}
    for uncond, ref, compute in itertools.product((True, False), (True, False), ("fp32", "fp64")):
        for wanted in ([(True, False), (False, True), (True, True)] if uncond else [(True, False)]):
            assert (uncond, ref, compute, *wanted) in subsets


def test_no_specialisation_spills_registers(compiled):
    """ptxas's report: at most 255 registers a thread and no local memory (spills) in any specialisation."""
    over = [f"{r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['registers']} registers, {r['local_bytes']} B local"
            for r in compiled if r["registers"] > 255 or r["local_bytes"] > 0]
    assert not over, "\n".join(over)
