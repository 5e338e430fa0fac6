"""The ``"gradient_at"`` core: per-sample ||J_s - J_t||_2 of two input-gradient tensors.

Only the reference is registered: the cost of gradient AT is the double backprop through the
student, not this distance. A fused implementation would register here with the signature
``fn(student_grad (B, ...), teacher_grad (B, ...)) -> (B,)``.
"""

from kdfast import backends
from kdfast.reference.gradient_attention import gradient_distance

CORE = "gradient_at"

backends.register(CORE, "reference", gradient_distance)
