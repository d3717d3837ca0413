"""Build entry point. Metadata lives in pyproject.toml; this file adds the optional C++ CPU extension.

The extension (`fastgrpo._C`, from csrc/) needs torch at build time. Install torch first and build with
`pip install --no-build-isolation ...` to get it; under build isolation (or with FASTGRPO_NO_EXT=1) it is skipped
and `fastgrpo.ops` serves CPU calls with the PyTorch reference, saying so once.
"""

import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTGRPO_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastgrpo: torch is not importable at build time; the C++ CPU extension is skipped "
              "(install torch first, then pip install --no-build-isolation)", file=sys.stderr)
    else:
        # The extension is built on the machine that runs it, so it may use that CPU's vector units;
        # FASTGRPO_CPU_FLAGS replaces -march=native (e.g. "-mavx2 -mfma" for a portable build).
        arch = os.environ.get("FASTGRPO_CPU_FLAGS", "-march=native").split()
        # -fno-trapping-math lets GCC turn branches on floats (the clamp in the attention's exp) into selects, so
        # those loops vectorise; it changes no result, only the assumption that comparisons may trap.
        ext_modules = [CppExtension("fastgrpo._C", ["csrc/fastgrpo_cpu.cpp", "csrc/attention_cpu.cpp",
                                                      "csrc/matching_cpu.cpp"],
                                    depends=["csrc/attention_cpu.h", "csrc/matching_cpu.h", "csrc/chunks.h"],
                                    extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math", *arch],
                                    extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
