"""Builds kdfast and its extension kdfast._C (C++ kernels always; CUDA kernels when torch
has CUDA and a CUDA toolkit is found).

    pip install --no-build-isolation -e .      # uses the torch already installed
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    import torch

    if os.environ.get("KDFAST_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    sources = ["csrc/kdfast.cpp", *_sources("csrc/cpu/*.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fno-trapping-math: loops with floating-point selects vectorise on AVX2 too (GCC may
    # then speculate comparisons; only FP exception flags, never read, can differ).
    # -ffp-contract=fast: a * b + c as one FMA where the ISA has it (csrc/include/kdfast/simd.h;
    # GCC's default outside ISO mode, which -std=c++17 turns off).
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math", "-ffp-contract=fast"]
    if _want_cuda():
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        return cpp_extension.CUDAExtension(
            "kdfast._C", sources, include_dirs=include_dirs,
            define_macros=[("KDFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"])
    return cpp_extension.CppExtension(
        "kdfast._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="kdfast",
    version="0.1.0",
    description="Fused-kernel knowledge-distillation losses for PyTorch",
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
