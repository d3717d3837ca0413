#!/usr/bin/env bash
# fastgrpo device check: one command on one CUDA GPU, at most 8 minutes (DEVICE_CHECK_BUDGET seconds, default 470).
#
#     bash bench/device_check.sh            (from the project root; everything is written under $OUT when set)
#
# Sections, each in its own subshell under `timeout`, so one failure or hang does not lose the rest:
#   env       GPU, driver, clocks, package versions
#   install   carried wheels (.whl/) into /tmp/site; the project editable, without build isolation and without the
#             C++ CPU extension (FASTGRPO_NO_EXT=1: its CPU kernels are not what a GPU check is for)
#   dispatch  `fastgrpo info`: backend=auto must pick Triton for CUDA tensors
#   kernels   tests/test_kernels.py, tests/test_flow.py (the step ops; not the diffusers examples) and
#             tests/test_matching.py (the advantage-weighted matching loss) on CUDA tensors with compiled Triton (FASTGRPO_TEST_DEVICE=cuda, no
#             interpreter): every correctness case against the fp64 reference, gradients, opcheck, torch.compile,
#             launch counts
#   ops       bench/test_bench_ops.py, bench/test_bench_dropin.py, bench/test_bench_matching.py: fused / eager / torch.compile'd / peer-style, GB/s, % of measured copy bandwidth,
#             launches per call, NVML clocks
#   graph     bench/test_bench_cuda_graph.py: a rollout step captured in a CUDA graph and replayed
#   unet      bench/test_bench_unet.py with Stable Diffusion v1.4's UNet (random init from its real config): CFG
#             rollout (samples/s, transitions/s, peak memory, SDPA vs xformers when it runs), bf16 training step
#             with and without gradient checkpointing, and the first step's |ratio - 1| when the rollout and
#             training batch sizes differ, per precision
#
# A GPU image may lack diffusers (the graph and unet sections need it; the others need torch and triton only).
# Bring its wheel from a machine with pip, into .whl/ in the project root (ignored by git), and carry that folder:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1
# Without it those sections say so in one line and are skipped.
set -o pipefail
OUT=${OUT:-/tmp/fastgrpo_device_check}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: > "$LOG"
BUDGET=${DEVICE_CHECK_BUDGET:-470}
PY=${PYTHON:-python3}
export OUT PY PYTHONUNBUFFERED=1
unset TRITON_INTERPRET FASTGRPO_BACKEND
export PYTHONPATH="/tmp/site:$PWD:$PWD/kernels:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "$*" | tee -a "$LOG"; }
section() {  # section NAME LIMIT_S COMMAND...: COMMAND in a subshell under timeout, its output in the log
  local name=$1 limit=$2 left rc
  shift 2
  left=$((BUDGET - SECONDS))
  if ((limit > left)); then limit=$left; fi
  if ((limit < 10)); then
    log "##### [$name] SKIPPED: ${left}s of the ${BUDGET}s budget left"
    return 0
  fi
  log "##### [$name] start (timeout ${limit}s, t=${SECONDS}s)"
  (timeout -k 5 "$limit" "$@") 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if ((rc == 124 || rc == 137)); then log "##### [$name] TIMED OUT after ${limit}s"; fi
  log "##### [$name] rc=$rc (t=${SECONDS}s)"
}
have_diffusers() { "$PY" -c "import diffusers" 2>/dev/null; }

ENV_PY=$(mktemp /tmp/device_env.XXXXXX.py)
cat > "$ENV_PY" <<'EOF'
import importlib, sys, torch
p = torch.cuda.get_device_properties(0)
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | {p.name}, "
      f"cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
for name in ("triton", "diffusers", "xformers", "pynvml", "pytest_benchmark", "hypothesis"):
    try:
        print(f"  {name:17s} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as error:  # noqa: BLE001
        print(f"  {name:17s} missing ({type(error).__name__})")
EOF
section env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,\
driver_version --format=csv; "$PY" "$0"' "$ENV_PY"

section install 60 bash -c '
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && echo "carried wheels installed: $(ls .whl)"
else
  echo "no .whl/ folder: nothing carried"
fi
FASTGRPO_NO_EXT=1 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  && echo "fastgrpo installed editable (no C++ CPU extension)" || echo "pip install -e . failed; using PYTHONPATH"'

section dispatch 30 "$PY" -c "from fastgrpo.info import backend_table; print(backend_table(['cuda']), end='')"

section kernels 150 env FASTGRPO_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  tests/test_flow.py tests/test_matching.py -k "not cpp_extension_is_built and not info_lists and not dropin and not euler and not thread_count" \
  --junitxml="$OUT/kernels_cuda.xml"

section ops 150 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_ops.py bench/test_bench_dropin.py \
  bench/test_bench_matching.py \
  --benchmark-json="$OUT/bench_ops.json" --benchmark-columns=median,iqr

if have_diffusers; then
  section graph 60 env FASTGRPO_BENCH_UNET=sd14 "$PY" -m pytest -q -p no:cacheprovider \
    bench/test_bench_cuda_graph.py --benchmark-json="$OUT/bench_graph.json" --benchmark-columns=median
  section unet 180 env FASTGRPO_BENCH_UNET=sd14 "$PY" -m pytest -q -s -p no:cacheprovider bench/test_bench_unet.py \
    --benchmark-json="$OUT/bench_unet.json" --benchmark-columns=median
else
  log "##### [graph, unet] SKIPPED: diffusers is not importable here (bring its wheel in .whl/, see the header)"
fi

section summary 30 "$PY" - <<'EOF'
"""One table from the benchmark JSON files: the numbers the README quotes."""
import json, os

out = os.environ["OUT"]
keys = ("speedup_vs_eager", "speedup_vs_compiled", "speedup_vs_eager_loop", "speedup_vs_peer_style_eager", "gbps", "fraction_of_copy",
        "launches_per_call",
        "samples_per_s", "transitions_per_s", "peak_memory_bytes", "max_abs_ratio_minus_1", "on_policy_within_clip",
        "eager_over_graph")
for name in ("bench_ops.json", "bench_graph.json", "bench_unet.json"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        print(f"{name}: not written")
        continue
    for bench in json.load(open(path))["benchmarks"]:
        info = bench.get("extra_info", {})
        shown = ", ".join(f"{k}={info[k]:.4g}" if isinstance(info[k], float) else f"{k}={info[k]}"
                          for k in keys if k in info)
        print(f"{bench['name']:55s} median {bench['stats']['median'] * 1e3:9.3f} ms  {shown}")
EOF
log "##### done in ${SECONDS}s of ${BUDGET}s; files in $OUT"
