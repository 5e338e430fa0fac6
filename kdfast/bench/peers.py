"""Other libraries' implementations of a core: optional providers of the benchmark.

A core lists them in ``Core.peers`` (provider name -> ``"module:function"``). Each function
``build(core, students, teachers)`` returns ``fn(students, teachers) -> loss`` that computes
the same number as kdfast's public loss with the core's options, or raises ImportError where
the library is not installed (the rows say "not available" and why) and ValueError where it
cannot express the core's options ("unsupported"). Nothing here imports a peer library at
import time: it stays an optional dependency.

* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``pip install liger-kernel``;
  its chunked losses are torch code, so they run on the CPU too). Its conventions, read from
  liger_kernel/chunked_loss/{jsd_loss,fused_linear_distillation}.py (0.8.5): logits
  h Wᵀ + b with the weight (V, H) as kdfast's, both divided by T and no T² factor;
  JSD(β) = β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m), m = β p_t + (1 − β) p_s, with β = 0 the
  forward KL(p_t ‖ p_s) and β = 1 the reverse KL(p_s ‖ p_t) exactly (kdfast's ``"jsd"``,
  ``"forward"``, ``"reverse"``); summed over the vocabulary per token, ignored labels masked,
  the sum over tokens divided by the count of kept labels (kdfast's ``"mean"``);
  loss = weight_hard · CE(untempered logits) + weight_soft · D. So kdfast's
  soft_weight · T² · D is weight_soft_loss = soft_weight · T² (soft_weight alone with
  ``scale_by_temperature_squared=False``). It accumulates the loss in fp32 and takes the CE's
  log-softmax in fp32 whatever the inputs' dtype. Chunks: ``torch.chunk`` into N // chunk_size
  pieces (its default chunk_size 1024 and ``compiled=True``, each chunk's value and gradient
  under ``torch.compile``, are what is benchmarked).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdfast.bench.cores import IGNORE_INDEX, Call, Core, Tensors

LIGER_BETA = {"forward": lambda beta: 0.0, "reverse": lambda beta: 1.0, "jsd": lambda beta: beta}
LIGER_OPTIONS = {"divergence", "beta", "temperature", "soft_weight", "hard_weight",
                 "scale_by_temperature_squared"}


def liger_fused_linear_jsd(core: Core, students: Tensors, teachers: Tensors,
                           compiled: bool = True) -> Callable[[Tensors, Tensors], torch.Tensor]:
    """Liger-Kernel's fused linear JSD configured as kdfast's ``fused_linear_kd_loss`` with
    ``core.options`` (a hidden-state teacher and labels, ``reduction="mean"``)."""
    options = dict(core.options)
    divergence = options.get("divergence", "forward")
    unsupported = sorted(set(options) - LIGER_OPTIONS)
    if divergence not in LIGER_BETA or unsupported:
        raise ValueError(f"Liger-Kernel's fused linear JSD has no {divergence!r} divergence"
                         if divergence not in LIGER_BETA else
                         f"Liger-Kernel's fused linear JSD has no {', '.join(unsupported)}")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    temperature = float(options.get("temperature", 1.0))
    soft_weight = float(options.get("soft_weight", 1.0))
    if options.get("scale_by_temperature_squared", True):
        soft_weight *= temperature**2
    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=float(options.get("hard_weight", 0.0)), weight_soft_loss=soft_weight,
        beta=LIGER_BETA[divergence](float(options.get("beta", 0.5))), ignore_index=IGNORE_INDEX,
        temperature=temperature, compiled=compiled)

    def fn(students: Tensors, teachers: Tensors) -> torch.Tensor:
        packed = core.pack(students, teachers)
        if not isinstance(packed, Call) or len(packed.args) != 4 or set(packed.keywords) != \
                {"labels"}:
            raise ValueError("the liger provider takes (hidden, weight, teacher hidden, "
                             "teacher weight) and labels")
        return loss(*packed.args, packed.keywords["labels"])
    return fn
