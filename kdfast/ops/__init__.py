"""Every backend of every core, one file per core: ``kdfast/ops/<core>.py``.

A file holds its core's ``CORE`` key (what ``kdfast.losses`` pass to
:func:`kdfast.backends.choose`), the native autograd Function over ``torch.ops.kdfast.*``,
the Triton ``torch.library`` custom operators (``torch.ops.kdfast_triton.*``, each importing
its launcher module ``kdfast.triton.<core>`` on first use), their fakes and autograd Function,
and at the bottom one ``backends.register(CORE, backend, fn, supports)`` per backend:

* ``attention.py`` — ``"attention_map"`` (AT): reference, native, triton;
* ``gram.py`` — ``"similarity"`` (SP) and ``"fsp"`` (FSP): reference, native, triton;
* ``mmd.py`` — ``"channel_mmd"`` (NST): reference, native, triton;
* ``softmax_kl.py`` — ``"softmax_kl"`` (KD, DML, BAN, CWD): reference, native, triton;
* ``fused_linear_kd.py`` — ``"fused_linear_kd"`` (the LLM lm_head + KD loss, chunked over
  tokens on the ``"softmax_kl"`` core): reference, native;
* ``gradient_attention.py`` — ``"gradient_at"``, ``rkd.py`` — ``"rkd"``, ``ab.py`` —
  ``"ab"``, ``fitnet.py`` — ``"fitnet"``, ``pkd.py`` — ``"pkd"``, ``mgd.py`` — ``"mgd"``:
  reference only (so ``backend=`` behaves as for every other loss).

Shared: :mod:`kdfast.ops._higher_order` (differentiable backwards through the reference) and
:mod:`kdfast.ops._triton_common` (what the Triton op layers share). ``docs/architecture.md``
maps every loss to its core and files.
"""
