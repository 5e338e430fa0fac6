"""Compiles every kdfast Triton kernel for a GPU target down to a cubin, without a GPU.

Triton's wheel ships ptxas, so ``triton.compile`` can lower each kernel (TTIR -> TTGIR -> LLVM
IR -> PTX -> cubin) for an NVIDIA architecture on any machine. This catches what the CPU
interpreter cannot: type errors of the compiler, unsupported ops, block shapes tl.dot refuses,
register/shared-memory limits that make ptxas fail, shared memory above the target's per-block
limit (a launch would fail), and it reports how each tl.dot was lowered (wgmma, mma.sync or
FMA, read off the PTX). It does not run anything: the numbers come
from the interpreter tests and, on a lent GPU, from ``scripts/gpu_check.sh``.

    python scripts/triton_aot_check.py [--arch 90] [--all-configs]

Run it without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
Exit status 1 if any kernel fails to compile; each failure is printed with its error.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kdfast.triton import _gemm, attention, gram, mmd, softmax_kl  # noqa: E402

TL = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Pointers that carry the input's dtype; every other pointer holds float32 results/weights.
INPUT_POINTERS = {"x_ptr", "dx_ptr", "da_ptr", "y_ptr", "s_ptr", "t_ptr", "a_ptr", "b_ptr",
                  "sa_ptr", "sb_ptr", "ta_ptr", "tb_ptr", "z1_ptr", "z2_ptr", "gs_ptr", "gt_ptr"}
FLOATS = {"eps"}
# Opt-in shared memory per block (bytes) by compute capability: a variant above it compiles
# but fails at launch with "out of resources", which autotuning would hit on the GPU.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


def unwrap(kernel):
    """(JITFunction, autotune configs or [None]) of a possibly autotuned kernel."""
    if isinstance(kernel, triton.runtime.Autotuner):
        return kernel.fn, kernel.configs
    return kernel, [None]


def signature(fn, dtype: str, constexprs: dict, input_out: bool) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            is_input = name in INPUT_POINTERS or (name == "out_ptr" and input_out)
            sig[name] = f"*{TL[dtype] if is_input else 'fp32'}"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def matrix_instruction(compiled) -> str:
    """How tl.dot was lowered, read off the PTX: Hopper's asynchronous warpgroup MMA
    (``wgmma``), the warp-level tensor-core ``mma.sync``, or neither (FMA: float32 IEEE)."""
    ptx = compiled.asm.get("ptx", "")
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma.sync" if "mma.sync" in ptx else "fma"


def cases():
    """(label, kernel, dtype, constexprs, out_ptr holds the input dtype) to compile."""
    precisions = {"float32": ["ieee", "tf32"], "float16": ["tf32"], "bfloat16": ["tf32"]}
    for dtype, mode in itertools.product(TL, (0, 1, 2)):
        yield f"at_forward p-mode {mode}", attention._at_forward_kernel, dtype, {"P_MODE": mode}
        yield f"at_backward p-mode {mode}", attention._at_backward_kernel, dtype, {"P_MODE": mode}
    yield ("at_normalise", attention._at_normalise_kernel, "float32",
           {"BLOCK_HW": 128, "BLOCKS_POW2": 512})
    for dtype in TL:
        for precision in precisions[dtype]:
            dot = {"DOT_PRECISION": precision}
            yield "sp_gram", gram._sp_gram_kernel, dtype, {"SPLITS": 8, **dot}
            yield "fsp", gram._fsp_kernel, dtype, dot
            for second in (False, True):
                yield (f"rows_gemm two={second}", _gemm._rows_gemm_kernel, dtype,
                       {"HAS_SECOND": second, **dot, "_out_is_input": True})
            for kernel, symmetric in itertools.product((0, 1, 2), (True, False)):
                yield (f"mmd_block kernel {kernel} symmetric={symmetric}", mmd._mmd_block_kernel,
                       dtype, {"KERNEL": kernel, "DEGREE": 2, "NUM_SIGMA": 2,
                               "SYMMETRIC": symmetric, "EXCLUDE_DIAG": symmetric,
                               "SAVE_GRAM": True, "STORE_NORMS": not symmetric, **dot})
            for kernel, has_self in itertools.product((0, 1, 2), (True, False)):
                yield (f"mmd_recompute_backward kernel {kernel} self={has_self}",
                       mmd._mmd_recompute_backward_kernel, dtype,
                       {"KERNEL": kernel, "DEGREE": 2, "NUM_SIGMA": 2, "HAS_SELF": has_self,
                        "EXCLUDE_DIAG": has_self, "BLOCK_D": 128, **dot})
        yield "row_sq", mmd._row_sq_kernel, dtype, {"BLOCK_R": 16, "BLOCK_HW": 64}
        yield "unit_sum", mmd._unit_sum_kernel, dtype, {"BLOCK_R": 16, "BLOCK_HW": 64}
        yield ("linear_backward", mmd._linear_backward_kernel, dtype,
               {"BLOCK_R": 16, "BLOCK_HW": 64})
    yield "sp_rows", gram._sp_rows_kernel, "float32", {"SPLITS": 8, "BLOCK": 256}
    for dtype, kind in itertools.product(TL, (0, 1, 2)):
        yield (f"softmax_kl_stats divergence {kind}", softmax_kl._softmax_kl_stats_kernel, dtype,
               {"DIVERGENCE": kind})
        for grads in ((True, False), (False, True), (True, True)):
            yield (f"softmax_kl_backward divergence {kind} grads {grads}",
                   softmax_kl._softmax_kl_backward_kernel, dtype,
                   {"DIVERGENCE": kind, "GRAD_S": grads[0], "GRAD_T": grads[1]})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, 90 = H100")
    parser.add_argument("--only", default="", help="compile the kernels whose label has this")
    parser.add_argument("--all-configs", action="store_true",
                        help="every autotune configuration (default: the first and the last)")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures, count, start, most_shared = [], 0, time.time(), 0
    matrix_units: dict[str, set[str]] = {}
    for label, kernel, dtype, constexprs in cases():
        if args.only not in label:
            continue
        fn, configs = unwrap(kernel)
        constexprs = dict(constexprs)
        input_out = constexprs.pop("_out_is_input", False)
        chosen = configs if args.all_configs or len(configs) <= 2 else [configs[0], configs[-1]]
        for config in chosen:
            meta = dict(constexprs, **(config.kwargs if config else {}))
            options = ({"num_warps": config.num_warps, "num_stages": config.num_stages}
                       if config else {})
            src = ASTSource(fn=fn, signature=signature(fn, dtype, meta, input_out),
                            constexprs=meta)
            count += 1
            name = f"{label} [{dtype}] {meta} {options}"
            try:
                compiled = triton.compile(src, target=target, options=options)
            except Exception as error:  # noqa: BLE001 - report every failure, then exit 1
                failures.append(f"{name}: {type(error).__name__}: {str(error)[:400]}")
                continue
            if "DOT_PRECISION" in meta:
                key = f"{label} [{dtype}, {meta['DOT_PRECISION']}]"
                matrix_units.setdefault(key, set()).add(matrix_instruction(compiled))
            shared, limit = compiled.metadata.shared, SHARED_LIMIT.get(args.arch)
            most_shared = max(most_shared, shared)
            if limit is not None and shared > limit:
                failures.append(f"{name}: needs {shared} B of shared memory, sm_{args.arch} "
                                f"has {limit} B per block")
    print(f"compiled {count - len(failures)}/{count} kernel variants for sm_{args.arch} "
          f"with triton {triton.__version__} in {time.time() - start:.0f} s (most shared memory "
          f"of one: {most_shared} B)")
    print("tl.dot lowering per kernel variant (over its configurations):")
    for key, kinds in sorted(matrix_units.items()):
        print(f"  {key}: {', '.join(sorted(kinds))}")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
