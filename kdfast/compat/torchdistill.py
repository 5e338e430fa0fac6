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

Where torchdistill has the loss, the kdfast one also takes that loss's own keywords
(``TORCHDISTILL_SPELLINGS``), so renaming the key alone switches the config:

==================  ==============  =======================================================
torchdistill key    kdfast key      by renaming the key alone
==================  ==============  =======================================================
KDLoss              KDFastKDLoss    same value (``alpha``/``beta`` label mixture, bare KL)
LogitStdKDLoss      KDFastLSKDLoss  same value (as KDLoss)
ATLoss              KDFastATLoss    same value (``at_pairs``, ``mode`` code / paper)
AltActTransferLoss  KDFastABLoss    same value (``feature_pairs``, ``margin``)
RKDLoss             KDFastRKDLoss   same value (``*_output_path``, ``*_factor``; 'mean')
CCKDLoss            KDFastCCLoss    same value (``*_linear_path``, ``kernel_config``)
DISTLoss            KDFastDISTLoss  same value (``tau``)
SRDLoss             KDFastSRDLoss   same value (``*_feature_module_*``, ``*_linear_module_*``)
PKTLoss             KDFastPKTLoss   same value (the same keywords)
SPKDLoss            KDFastSPLoss    runs; differs on purpose: L2 rows (paper), not L1
FSPLoss             KDFastFSPLoss   runs; differs on purpose: squared Frobenius mean (paper,
                                    RepDistiller), not column L2 norms, avg not max pool
==================  ==============  =======================================================

torchdistill's ``reduction`` is read by its meaning (``'batchmean'`` is kdfast's
``'mean'``); a value with no kdfast equivalent raises ValueError. kdfast's other losses
(NST, DKD, CWD, FitNet, PKD, WSLD, KDSVD) have no torchdistill counterpart.

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.nn.functional import cross_entropy

import kdfast

try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as error:  # pragma: no cover - exercised only without torchdistill
    raise ImportError(
        "kdfast.compat.torchdistill needs torchdistill; install it with "
        "`pip install --no-deps torchdistill` (its losses import without its dependencies)"
    ) from error


@dataclass(frozen=True)
class TorchdistillSpelling:
    """How torchdistill's own loss ``name`` spells the keywords of a kdfast loss.

    Any keyword below in a config selects torchdistill's meaning for the whole config (its
    ``reduction`` values included); without one the kdfast loss reads its own keywords.

    ``output_paths``: ``<side>_..._path`` keyword -> kdfast input prefix, its io ``'output'``.
    ``module_renames``: torchdistill prefix -> kdfast prefix (``_path`` and ``_io`` both).
    ``pairs``: the keyword of a dict of weighted input pairs (``at_pairs``); each pair names
    every input by the kdfast prefix without ``_module`` (``student``, ``student_first``) as
    ``{path, io}``, plus ``weight`` (default 1); the loss is the weighted sum over pairs.
    ``renames``: option -> kdfast option. ``nested``: a dict option -> its keys' kdfast names.
    ``reductions``: torchdistill ``reduction`` -> kdfast's; another value raises.
    ``label_mixture``: ``alpha`` / ``beta`` mix the label cross-entropy in, as
    torchdistill's ``KDLoss`` does.
    """

    name: str
    output_paths: Mapping[str, str] = field(default_factory=dict)
    module_renames: Mapping[str, str] = field(default_factory=dict)
    pairs: str | None = None
    renames: Mapping[str, str] = field(default_factory=dict)
    nested: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    reductions: Mapping[str, str] | None = None
    label_mixture: bool = False

    def keywords(self) -> set[str]:
        own = {*self.output_paths, *self.renames, *self.nested}
        own |= {f"{prefix}_{io}" for prefix in self.module_renames for io in ("path", "io")}
        if self.pairs:
            own.add(self.pairs)
        if self.label_mixture:
            own |= {"alpha", "beta"}
        return own


_TORCHDISTILL_REDUCTION = {"batchmean": "mean"}
_LABEL_MIXTURE_REDUCTION = {"batchmean": "mean", "sum": "sum"}
_OUTPUT_PATHS = {"student_output_path": "student_module",
                 "teacher_output_path": "teacher_module"}

# kdfast loss -> the keywords of its torchdistill counterpart (torchdistill 1.1.5 mid_level)
TORCHDISTILL_SPELLINGS = {
    "KDFastKDLoss": TorchdistillSpelling("KDLoss", reductions=_LABEL_MIXTURE_REDUCTION,
                                         label_mixture=True),
    "KDFastLSKDLoss": TorchdistillSpelling("LogitStdKDLoss",
                                           reductions=_LABEL_MIXTURE_REDUCTION,
                                           label_mixture=True),
    "KDFastATLoss": TorchdistillSpelling("ATLoss", pairs="at_pairs"),
    "KDFastABLoss": TorchdistillSpelling("AltActTransferLoss", pairs="feature_pairs",
                                         reductions={"mean": "mean", "sum": "sum"}),
    "KDFastFSPLoss": TorchdistillSpelling("FSPLoss", pairs="fsp_pairs"),
    "KDFastRKDLoss": TorchdistillSpelling(
        "RKDLoss", output_paths=_OUTPUT_PATHS,
        renames={"dist_factor": "distance_weight", "angle_factor": "angle_weight"},
        reductions={"mean": "mean"}),
    "KDFastSPLoss": TorchdistillSpelling("SPKDLoss", output_paths=_OUTPUT_PATHS,
                                         reductions=_TORCHDISTILL_REDUCTION),
    "KDFastCCLoss": TorchdistillSpelling(
        "CCKDLoss", output_paths={"student_linear_path": "student_module",
                                  "teacher_linear_path": "teacher_module"},
        nested={"kernel_config": {"type": "kernel", "gamma": "gamma", "max_p": "order"}},
        reductions=_TORCHDISTILL_REDUCTION),
    "KDFastDISTLoss": TorchdistillSpelling("DISTLoss", renames={"tau": "temperature"}),
    "KDFastSRDLoss": TorchdistillSpelling(
        "SRDLoss", module_renames={"student_feature_module": "student_module",
                                   "teacher_feature_module": "teacher_module",
                                   "student_linear_module": "student_logits_module",
                                   "teacher_linear_module": "teacher_logits_module"},
        reductions=_TORCHDISTILL_REDUCTION),
    # PKTLoss already takes kdfast's keywords
}


def _put(options: dict, key: str, value, loss_name: str) -> None:
    if key in options:
        raise TypeError(f"{loss_name} got {key!r} twice (once under torchdistill's name)")
    options[key] = value


def _translate(spelling: TorchdistillSpelling, options: dict, loss_name: str) -> tuple:
    """Rewrites torchdistill's keywords in ``options`` into kdfast's, in place; returns the
    pairs (or None) and the label mixture (alpha, beta) (or None)."""
    for keyword, prefix in spelling.output_paths.items():
        if keyword in options:
            _put(options, f"{prefix}_path", options.pop(keyword), loss_name)
            _put(options, f"{prefix}_io", "output", loss_name)
    for theirs, ours in spelling.module_renames.items():
        for io in ("path", "io"):
            if f"{theirs}_{io}" in options:
                _put(options, f"{ours}_{io}", options.pop(f"{theirs}_{io}"), loss_name)
    for theirs, ours in spelling.renames.items():
        if theirs in options:
            _put(options, ours, options.pop(theirs), loss_name)
    for keyword, names in spelling.nested.items():
        for key, value in options.pop(keyword, {}).items():
            if key not in names:
                raise TypeError(f"{loss_name}: unknown {keyword} key {key!r}")
            _put(options, names[key], value, loss_name)
    if spelling.reductions is not None and "reduction" in options:
        reduction = options["reduction"]
        if reduction not in spelling.reductions:
            raise ValueError(f"{loss_name} with torchdistill's {spelling.name} keywords takes "
                             f"reduction in {sorted(spelling.reductions)}, got {reduction!r}")
        options["reduction"] = spelling.reductions[reduction]
    pairs = options.pop(spelling.pairs) if spelling.pairs in options else None
    mixture = None
    if spelling.label_mixture and ("alpha" in options or "beta" in options):
        alpha, beta = options.pop("alpha", None), options.pop("beta", None)
        if alpha is None and beta is None:
            raise TypeError(f"{loss_name}: torchdistill's {spelling.name} needs alpha or beta")
        mixture = (alpha, 1 - alpha if beta is None else beta)
    return pairs, mixture


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
    ``TORCHDISTILL_SPELLINGS[name]``, if any, adds the keywords of torchdistill's own loss.
    """
    spelling = TORCHDISTILL_SPELLINGS.get(name)

    def __init__(self, **kwargs):
        nn.Module.__init__(self)
        pairs, self.label_mixture = None, None
        if spelling is not None and spelling.keywords() & kwargs.keys():
            pairs, self.label_mixture = _translate(spelling, kwargs, name)
        if pairs is not None:
            # one term per pair: (weight, ((side, path, io) per input))
            self.terms = [(pair.get("weight", 1),
                           tuple((side, pair[prefix.removesuffix("_module")]["path"],
                                  pair[prefix.removesuffix("_module")]["io"])
                                 for side, prefix in inputs))
                          for pair in pairs.values()]
        else:
            keywords = [(f"{prefix}_path", f"{prefix}_io") for _, prefix in inputs]
            missing = [k for pair in keywords for k in pair if k not in kwargs]
            if missing:
                raise TypeError(f"{name} needs the keywords {', '.join(missing)} (the module "
                                "path and 'input'/'output' of each value it reads from the "
                                "io_dict)")
            self.terms = [(1, tuple((side, kwargs.pop(f"{prefix}_path"),
                                     kwargs.pop(f"{prefix}_io")) for side, prefix in inputs))]
        self.kdfast_loss = kdfast_loss(**kwargs)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        io_dicts = {"student": student_io_dict, "teacher": teacher_io_dict}
        total = 0
        for weight, reads in self.terms:
            values = [io_dicts[side][path][io] for side, path, io in reads]
            loss_inputs = arrange(*values) if arrange is not None else values
            if uses_targets:
                if targets is None:
                    raise ValueError(f"{name} needs the labels: torchdistill passes them as "
                                     "targets; got None")
                loss_inputs = [*loss_inputs, targets]
            total = total + weight * self.kdfast_loss(*loss_inputs)
        if self.label_mixture is None:
            return total
        # torchdistill's KDLoss: alpha CE + beta T^2 KL, or the bare KL (no T^2) without
        # alpha or labels; kdfast's core gives T^2 KL
        alpha, beta = self.label_mixture
        temperature = self.kdfast_loss.temperature
        if not alpha or targets is None:
            return total / temperature ** 2
        hard = cross_entropy(values[0], targets, reduction=self.kdfast_loss.reduction)
        return alpha * hard + beta * total

    def __str__(self):
        return f"{name}({self.kdfast_loss.extra_repr()})"

    reads = ", ".join(f"``{side}_io_dict[{prefix}_path][{prefix}_io]``"
                      for side, prefix in inputs)
    doc = (f"torchdistill loss over :class:`kdfast.{kdfast_loss.__name__}`: reads {reads}"
           f"{' and the targets' if uses_targets else ''} and returns "
           f"``kdfast.{kdfast_loss.__name__}(**options)`` of them.")
    if spelling is not None:
        doc += (f"\n\nAlso takes the keywords of torchdistill's ``{spelling.name}`` "
                f"({', '.join(f'``{k}``' for k in sorted(spelling.keywords()))}), so that "
                "renaming its key switches a config.")
    if note:
        doc += "\n\n" + note
    cls = type(name, (nn.Module,), {"__init__": __init__, "forward": forward,
                                    "__str__": __str__, "__doc__": doc,
                                    "__module__": __name__})
    return register_mid_level_loss(cls)


# FSP and KDSVD read two maps per side, a layer's and a later layer's
_CONSECUTIVE_MAPS = (("student", "student_first_module"), ("student", "student_second_module"),
                     ("teacher", "teacher_first_module"), ("teacher", "teacher_second_module"))

_CONNECTOR_NOTE = ("With ``student_channels`` / ``teacher_channels`` the criterion holds a "
                   "trainable connector: add the criterion's parameters to the student's "
                   "optimiser.")
KDFastKDLoss = _define_loss(
    "KDFastKDLoss", kdfast.KDLoss,
    note="With kdfast's keywords, the batch mean of T^2 KL(p_t || p_s). With torchdistill's "
         "``alpha`` / ``beta``, its ``KDLoss`` exactly: ``alpha`` CE(student, targets) + "
         "``beta`` (default 1 - alpha) T^2 KL, or the bare KL without T^2 when ``alpha`` is "
         "0 / None or there are no targets.")
KDFastATLoss = _define_loss(
    "KDFastATLoss", kdfast.ATLoss,
    note="One pair of maps per loss, or torchdistill's ``at_pairs``: the weighted sum over "
         "pairs; ``mode='code'`` is its mean over B·HW, ``'paper'`` its batch mean of the "
         "L2 distances, as in its ``ATLoss``.")
KDFastSPLoss = _define_loss(
    "KDFastSPLoss", kdfast.SPLoss,
    note="Follows the paper (Tung & Mori, 2019) and RepDistiller: each row of the Gram "
         "matrix is divided by its L2 norm. torchdistill's ``SPKDLoss`` normalises the rows "
         "with ``F.normalize(x, 1)``, an L1 norm, so its values differ (its keywords are "
         "taken all the same).")
KDFastNSTLoss = _define_loss("KDFastNSTLoss", kdfast.NSTLoss)
KDFastFSPLoss = _define_loss(
    "KDFastFSPLoss", kdfast.FSPLoss,
    inputs=_CONSECUTIVE_MAPS, arrange=lambda s1, s2, t1, t2: ([(s1, s2)], [(t1, t2)]),
    note="One FSP matrix pair per loss, or torchdistill's ``fsp_pairs`` (the weighted sum "
         "over pairs). Follows the paper (Yim et al., 2017; squared Frobenius distance) as "
         "RepDistiller does, per pair the mean over B·C_a·C_b of the squared differences, "
         "maps average-pooled to the smaller size. torchdistill's ``FSPLoss`` sums the "
         "unsquared L2 norms of the columns of G_s - G_t over the batch mean and max-pools, "
         "so its values differ.")
KDFastRKDLoss = _define_loss("KDFastRKDLoss", kdfast.RKDLoss)
KDFastABLoss = _define_loss(
    "KDFastABLoss", kdfast.ABLoss,
    note=_CONNECTOR_NOTE)
KDFastPKTLoss = _define_loss("KDFastPKTLoss", kdfast.PKTLoss)
KDFastCCLoss = _define_loss("KDFastCCLoss", kdfast.CCLoss)
KDFastDKDLoss = _define_loss("KDFastDKDLoss", kdfast.DKDLoss, uses_targets=True)
KDFastDISTLoss = _define_loss("KDFastDISTLoss", kdfast.DISTLoss)
KDFastCWDLoss = _define_loss("KDFastCWDLoss", kdfast.CWDLoss)
KDFastFitNetLoss = _define_loss(
    "KDFastFitNetLoss", kdfast.FitNetLoss,
    note=_CONNECTOR_NOTE)
KDFastPKDLoss = _define_loss("KDFastPKDLoss", kdfast.PKDLoss)
KDFastLSKDLoss = _define_loss(
    "KDFastLSKDLoss", kdfast.LSKDLoss,
    note="With torchdistill's ``alpha`` / ``beta``, its ``LogitStdKDLoss`` exactly (the label "
         "mixture of ``KDFastKDLoss``, the cross-entropy on the raw student logits).")
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
