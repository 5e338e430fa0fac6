"""kdfast's losses in torchdistill's loss registry: ``import kdfast.compat.torchdistill``.

Importing this module registers one middle-level loss per kdfast loss (``KDFastKDLoss``,
``KDFastATLoss``, ... see ``LOSS_NAMES``) with ``torchdistill.losses.registry``, so that a
torchdistill YAML config switches a loss to kdfast by renaming its ``key``::

    criterion:
      key: 'WeightedSumLoss'
      kwargs:
        sub_terms:
          kd:
            criterion:
              key: 'KDFastKDLoss'
              kwargs:
                student_module_path: 'fc'
                student_module_io: 'output'
                teacher_module_path: 'fc'
                teacher_module_io: 'output'
                temperature: 4.0
            weight: 1.0

Each loss takes torchdistill's keywords ``student_module_path``, ``student_module_io``,
``teacher_module_path``, ``teacher_module_io`` (the module and ``'input'`` / ``'output'``
whose value the forward hooks store in the ``io_dict``), plus the options of the kdfast
module it wraps (``kdfast.KDLoss`` for ``KDFastKDLoss``, ...; their defaults and meaning are
in those docstrings). Losses with more inputs name each one: FSP and KDSVD read
``student_first_module_*``, ``student_second_module_*``, ``teacher_first_module_*``,
``teacher_second_module_*``; SRD reads ``student_module_*`` / ``teacher_module_*`` (features)
and ``student_logits_module_*`` / ``teacher_logits_module_*``. Losses that need labels (DKD,
WSLD) read them from the ``targets`` torchdistill passes.

Not registered, because their inputs are not module ios of a frozen teacher and a student:
VID, FT, CRD, OFD, MGD and ReviewKD own trainable modules (variance, paraphraser/translator,
embeddings and memory banks, connector with a BatchNorm margin, generation block, fusion
blocks) that the training script builds and steps itself; gradient AT needs the input
gradient of both networks; DML, BAN and adversarial KD are training recipes where the
"teacher" trains too (``kdfast.recipes``).

torchdistill is optional: ``import kdfast`` never imports it, and importing this module
without it raises ImportError saying how to install it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

import kdfast

try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as error:  # pragma: no cover - exercised only without torchdistill
    raise ImportError(
        "kdfast.compat.torchdistill needs torchdistill; install it with "
        "`pip install --no-deps torchdistill` (its losses import without its dependencies)"
    ) from error


def _read_io(io_dict: dict, path: str, io: str):
    return io_dict[path][io]


def _define_loss(name: str, kdfast_loss: type[nn.Module], *,
                 inputs: Sequence[tuple[str, str]] = (("student", "student_module"),
                                                      ("teacher", "teacher_module")),
                 arrange: Callable | None = None, uses_targets: bool = False,
                 note: str = "") -> type[nn.Module]:
    """Builds, registers and returns the torchdistill middle-level loss ``name`` over the
    kdfast module ``kdfast_loss``.

    ``inputs`` lists, in the order ``kdfast_loss`` takes them, which io dict each input is
    read from (``"student"`` / ``"teacher"``) and the prefix of its two keywords
    (``<prefix>_path``, ``<prefix>_io``); ``arrange`` maps the values read to the module's
    arguments (default: as they are); ``uses_targets`` appends torchdistill's ``targets``.
    """
    keywords = [(side, f"{prefix}_path", f"{prefix}_io") for side, prefix in inputs]

    def __init__(self, **kwargs):
        nn.Module.__init__(self)
        missing = [k for _, path, io in keywords for k in (path, io) if k not in kwargs]
        if missing:
            raise TypeError(f"{name} needs the keywords {', '.join(missing)} (the module path "
                            "and 'input'/'output' of each value it reads from the io_dict)")
        for _, path, io in keywords:
            setattr(self, path, kwargs.pop(path))
            setattr(self, io, kwargs.pop(io))
        self.kdfast_loss = kdfast_loss(**kwargs)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        io_dicts = {"student": student_io_dict, "teacher": teacher_io_dict}
        values = [_read_io(io_dicts[side], getattr(self, path), getattr(self, io))
                  for side, path, io in keywords]
        loss_inputs = arrange(*values) if arrange is not None else values
        if uses_targets:
            if targets is None:
                raise ValueError(f"{name} needs the labels: torchdistill passes them as "
                                 "targets; got None")
            loss_inputs = [*loss_inputs, targets]
        return self.kdfast_loss(*loss_inputs)

    def __str__(self):
        return f"{name}({self.kdfast_loss.extra_repr()})"

    reads = ", ".join(f"``{side}_io_dict[{path}][{io}]``" for side, path, io in keywords)
    doc = (f"torchdistill loss over :class:`kdfast.{kdfast_loss.__name__}`: reads {reads}"
           f"{' and the targets' if uses_targets else ''} and returns "
           f"``kdfast.{kdfast_loss.__name__}(**options)`` of them.")
    if note:
        doc += "\n\n" + note
    cls = type(name, (nn.Module,), {"__init__": __init__, "forward": forward,
                                    "__str__": __str__, "__doc__": doc,
                                    "__module__": __name__})
    return register_mid_level_loss(cls)


# FSP and KDSVD read two maps per side, a layer's and a later layer's
_CONSECUTIVE_MAPS = (("student", "student_first_module"), ("student", "student_second_module"),
                     ("teacher", "teacher_first_module"), ("teacher", "teacher_second_module"))

KDFastKDLoss = _define_loss(
    "KDFastKDLoss", kdfast.KDLoss,
    note="The batch mean of T^2 KL(p_t || p_s) (torchdistill's ``KDLoss`` with ``alpha=0`` "
         "returns KL without the T^2; add the label cross-entropy as its own sub-term).")
KDFastATLoss = _define_loss(
    "KDFastATLoss", kdfast.ATLoss,
    note="One pair of maps per loss (torchdistill's ``ATLoss`` takes ``at_pairs``: use one "
         "sub-term per pair, with its weight).")
KDFastSPLoss = _define_loss(
    "KDFastSPLoss", kdfast.SPLoss,
    note="Follows the paper (Tung & Mori, 2019) and RepDistiller: each row of the Gram "
         "matrix is divided by its L2 norm. torchdistill's ``SPKDLoss`` normalises the rows "
         "with ``F.normalize(x, 1)``, an L1 norm, so its values differ.")
KDFastNSTLoss = _define_loss("KDFastNSTLoss", kdfast.NSTLoss)
KDFastFSPLoss = _define_loss(
    "KDFastFSPLoss", kdfast.FSPLoss,
    inputs=_CONSECUTIVE_MAPS, arrange=lambda s1, s2, t1, t2: ([(s1, s2)], [(t1, t2)]),
    note="One FSP matrix pair per loss (torchdistill's ``FSPLoss`` takes ``fsp_pairs``: use "
         "one sub-term per pair).")
KDFastRKDLoss = _define_loss("KDFastRKDLoss", kdfast.RKDLoss)
KDFastABLoss = _define_loss(
    "KDFastABLoss", kdfast.ABLoss,
    note="With ``student_channels`` / ``teacher_channels`` the criterion holds a trainable "
         "connector: add the criterion's parameters to the student's optimiser.")
KDFastPKTLoss = _define_loss("KDFastPKTLoss", kdfast.PKTLoss)
KDFastCCLoss = _define_loss("KDFastCCLoss", kdfast.CCLoss)
KDFastDKDLoss = _define_loss("KDFastDKDLoss", kdfast.DKDLoss, uses_targets=True)
KDFastDISTLoss = _define_loss("KDFastDISTLoss", kdfast.DISTLoss)
KDFastCWDLoss = _define_loss("KDFastCWDLoss", kdfast.CWDLoss)
KDFastFitNetLoss = _define_loss(
    "KDFastFitNetLoss", kdfast.FitNetLoss,
    note="With ``student_channels`` / ``teacher_channels`` the criterion holds a trainable "
         "connector: add the criterion's parameters to the student's optimiser.")
KDFastPKDLoss = _define_loss("KDFastPKDLoss", kdfast.PKDLoss)
KDFastLSKDLoss = _define_loss("KDFastLSKDLoss", kdfast.LSKDLoss)
KDFastWSLDLoss = _define_loss("KDFastWSLDLoss", kdfast.WSLDLoss, uses_targets=True)
KDFastKDSVDLoss = _define_loss(
    "KDFastKDSVDLoss", kdfast.KDSVDLoss, inputs=_CONSECUTIVE_MAPS,
    arrange=lambda s1, s2, t1, t2: ([s1, s2], [t1, t2]),
    note="Two consecutive maps per side (KDSVD relates consecutive maps), read as FSP reads "
         "them.")
KDFastSRDLoss = _define_loss(
    "KDFastSRDLoss", kdfast.SRDLoss,
    inputs=(("student", "student_module"), ("teacher", "teacher_module"),
            ("student", "student_logits_module"), ("teacher", "teacher_logits_module")),
    note="``student_module_*`` names the student's projected features (torchdistill's SRD "
         "projector, a module of the student model).")

LOSS_NAMES = (
    "KDFastKDLoss", "KDFastATLoss", "KDFastSPLoss", "KDFastNSTLoss", "KDFastFSPLoss",
    "KDFastRKDLoss", "KDFastABLoss", "KDFastPKTLoss", "KDFastCCLoss", "KDFastDKDLoss",
    "KDFastDISTLoss", "KDFastCWDLoss", "KDFastFitNetLoss", "KDFastPKDLoss", "KDFastLSKDLoss",
    "KDFastWSLDLoss", "KDFastKDSVDLoss", "KDFastSRDLoss",
)

__all__ = ["LOSS_NAMES", *LOSS_NAMES]
