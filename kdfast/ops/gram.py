"""Batch-Gram cores: SP's "similarity" and FSP's "fsp" (DESIGN.md §3, "Batch Gram").

Interfaces (inputs already validated and spatially matched; outputs per sample, (B,)):

* ``"similarity"``: ``fn(student (B, ...), teacher (B, ...))`` -> per-row SP loss whose mean
  is ``||G_t - G_s||_F^2 / B^2``, G = rownormalise(Q Q^T), Q the input flattened to B x D.
  Student and teacher may have different D.
* ``"fsp"``: ``fn(student_a, student_b, teacher_a, teacher_b)`` (each (B, C, H, W); a and b
  of one side share H, W; student C_a == teacher C_a, C_b likewise) -> per-sample mean over
  C_a*C_b of (G_s - G_t)^2, G = X_a X_b^T / HW. The student's H, W may differ from the
  teacher's (each G uses its own HW).

Both may receive non-contiguous or channels_last tensors, any floating dtype, and teachers
with or without ``requires_grad``. ``sp_loss`` calls ``backends.choose("similarity", backend,
student, teacher)`` and ``fsp_loss`` calls ``backends.choose("fsp", backend, student_a,
student_b, teacher_a, teacher_b)`` once per pair, so a ``supports`` predicate receives those
tensors (and can decline, e.g., student/teacher pairs of different H, W).

Only the reference implementations are registered here; native and Triton ones register
against the same names.
"""

from kdfast import backends
from kdfast.reference.fsp import fsp_pair_loss
from kdfast.reference.sp import similarity_loss

SIMILARITY = "similarity"
FSP = "fsp"

backends.register(SIMILARITY, "reference", similarity_loss)
backends.register(FSP, "reference", fsp_pair_loss)
