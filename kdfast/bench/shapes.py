"""Shape suites of the benchmark, defined once: ``python -m kdfast.bench`` and the
pytest-benchmark files under ``benchmarks/`` both read them from here.

Three kinds of input, one per family of loss:

* :class:`FeatureShape` (AT, NST, SP, FSP): student (B, C_s, H, W), teacher (B, C_t, H, W).
  FSP reads C_s and C_t as the channels of the two layers a and b of one pair (student and
  teacher both get (B, C_s, H, W) and (B, C_t, H, W)), since FSP needs equal channels per
  layer.
* :class:`LogitShape` (KD, DKD): student and teacher logits (B, classes).
* :class:`EmbeddingShape` (RKD): student (B, D_s), teacher (B, D_t).
* :class:`MapShape` (CWD): dense-prediction logit maps (B, classes, H, W), one shape for
  student and teacher (segmentation heads, e.g. 19 Cityscapes classes).
* :class:`LmHeadShape` (fused linear KD): N tokens of H-dim student hidden states, a (V, H)
  lm_head and (N, V) teacher logits (language-model vocabularies).

Every suite holds ResNet-style stage shapes plus two sweeps (feature-map size at fixed
channels, channels at a fixed map) so that the plots have lines to draw. The ``sweep`` suite
(the regression sweep, docs/regression_sweep.md) is the cifar and imagenet shapes together
with teachers 2× and 4× wider than the student on 7×7 ... 64×64 maps.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import ClassVar


@dataclass(frozen=True)
class FeatureShape:
    batch: int
    s_channels: int
    t_channels: int
    height: int
    width: int
    kind: ClassVar[str] = "features"
    # Plot axes: name -> the fields it varies (the other fields stay fixed along a line).
    axis_fields: ClassVar[dict] = {"feature-map size (H*W)": ("height", "width"),
                                   "channels (student)": ("s_channels", "t_channels")}

    @property
    def label(self) -> str:
        channels = (f"{self.s_channels}" if self.s_channels == self.t_channels
                    else f"{self.s_channels}/{self.t_channels}")
        return f"{self.batch}x{channels}x{self.height}x{self.width}"

    def axes(self) -> dict[str, int]:
        """The quantities the plots put on their x axes."""
        return {"feature-map size (H*W)": self.height * self.width,
                "channels (student)": self.s_channels}


@dataclass(frozen=True)
class LogitShape:
    batch: int
    classes: int
    kind: ClassVar[str] = "logits"
    axis_fields: ClassVar[dict] = {"batch (rows)": ("batch",), "classes": ("classes",)}

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.classes}"

    def axes(self) -> dict[str, int]:
        return {"batch (rows)": self.batch, "classes": self.classes}


@dataclass(frozen=True)
class EmbeddingShape:
    batch: int
    s_dim: int
    t_dim: int
    kind: ClassVar[str] = "embeddings"
    axis_fields: ClassVar[dict] = {"batch (rows)": ("batch",), "dim (student)": ("s_dim", "t_dim")}

    @property
    def label(self) -> str:
        dims = f"{self.s_dim}" if self.s_dim == self.t_dim else f"{self.s_dim}/{self.t_dim}"
        return f"{self.batch}x{dims}"

    def axes(self) -> dict[str, int]:
        return {"batch (rows)": self.batch, "dim (student)": self.s_dim}


@dataclass(frozen=True)
class MapShape:
    batch: int
    channels: int
    height: int
    width: int
    kind: ClassVar[str] = "maps"
    axis_fields: ClassVar[dict] = {"map size (H*W)": ("height", "width"),
                                   "classes": ("channels",)}

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.channels}x{self.height}x{self.width}"

    def axes(self) -> dict[str, int]:
        return {"map size (H*W)": self.height * self.width, "classes": self.channels}


@dataclass(frozen=True)
class LmHeadShape:
    tokens: int
    hidden: int
    vocab: int
    kind: ClassVar[str] = "lmhead"
    axis_fields: ClassVar[dict] = {"tokens": ("tokens",), "vocab": ("vocab",)}

    @property
    def label(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.vocab}"

    def axes(self) -> dict[str, int]:
        return {"tokens": self.tokens, "vocab": self.vocab}


Shape = FeatureShape | LogitShape | EmbeddingShape | MapShape | LmHeadShape


KINDS = {cls.kind: cls for cls in (FeatureShape, LogitShape, EmbeddingShape, MapShape,
                                   LmHeadShape)}


def shape_dict(shape: Shape) -> dict:
    """The shape as a JSON-ready dict, with its kind."""
    return {"kind": shape.kind, **asdict(shape)}


def shape_from_dict(fields: dict) -> Shape:
    """The inverse of :func:`shape_dict`."""
    fields = dict(fields)
    return KINDS[fields.pop("kind")](**fields)


def _features(batch: int, stages=(), spatial_sweep=None, channel_sweep=None
              ) -> tuple[FeatureShape, ...]:
    """Stage shapes ``(C, H)`` plus ``spatial_sweep=(C, [H...])`` and
    ``channel_sweep=(H, [C...])``, square maps, C_s = C_t, sorted and without repeats."""
    pairs = set(stages)
    if spatial_sweep:
        pairs |= {(spatial_sweep[0], h) for h in spatial_sweep[1]}
    if channel_sweep:
        pairs |= {(c, channel_sweep[0]) for c in channel_sweep[1]}
    return tuple(FeatureShape(batch, c, c, h, h) for c, h in sorted(pairs, key=lambda p: p[::-1]))


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    features: tuple[FeatureShape, ...]
    logits: tuple[LogitShape, ...]
    embeddings: tuple[EmbeddingShape, ...]
    maps: tuple[MapShape, ...] = ()
    lmhead: tuple[LmHeadShape, ...] = ()
    # Providers left out unless --providers names them (compiling takes minutes on a small CPU).
    skip_by_default: tuple[str, ...] = ()

    def shapes(self, kind: str) -> tuple[Shape, ...]:
        return getattr(self, kind)


_CIFAR = Suite(
    "cifar", "ResNet-style CIFAR maps 32x32/16x16/8x8, C 64-256, B 64",
    features=_features(64, stages=((64, 32), (128, 16), (256, 8)),
                       spatial_sweep=(128, (8, 16, 32)), channel_sweep=(16, (64, 128, 256))),
    logits=(LogitShape(64, 10), LogitShape(64, 100)),
    embeddings=(EmbeddingShape(64, 64, 256), EmbeddingShape(128, 64, 256)))

_IMAGENET = Suite(
    "imagenet", "ResNet-50 stages 56x56...7x7, C 256-2048, B 32 (B 256 for logits)",
    features=_features(32, stages=((256, 56), (512, 28), (1024, 14), (2048, 7)),
                       spatial_sweep=(512, (7, 14, 28, 56)),
                       channel_sweep=(14, (256, 512, 1024, 2048))),
    logits=(LogitShape(32, 1000), LogitShape(256, 1000)),
    embeddings=(EmbeddingShape(256, 512, 2048), EmbeddingShape(512, 512, 2048)))

# The regression sweep's teacher-wider-than-student pairs: C_t = 2·C_s and 4·C_s on square maps
# 7×7 ... 64×64. With C_s = 64 and 256 the maps straddle NST poly's switch between the D × D
# and the C × C Gram forms (D = H·W against C_s + C_t rows, e.g. 14×14 = 196 against 192 and
# 320 rows, 28×28 = 784 against 768 and 1280).
SWEEP_BATCH, SWEEP_STUDENT_CHANNELS, SWEEP_RATIOS = 8, (64, 256), (2, 4)
SWEEP_MAPS = (7, 14, 28, 64)


def _wider_teachers(batch: int, students, ratios, maps) -> tuple[FeatureShape, ...]:
    return tuple(FeatureShape(batch, c, r * c, h, h) for h in maps for c in students
                 for r in ratios)


def _union(*groups):
    """The shapes of ``groups`` in order, without repeats."""
    return tuple(dict.fromkeys(shape for group in groups for shape in group))


def _sweep(*suites: Suite) -> Suite:
    """Every shape of ``suites`` plus the wider-teacher channel sweep; one CWD map and one
    lm_head shape (of the quick suite) so that every core has rows."""
    wider = _wider_teachers(SWEEP_BATCH, SWEEP_STUDENT_CHANNELS, SWEEP_RATIOS, SWEEP_MAPS)
    return Suite(
        "sweep", "regression sweep: every cifar and imagenet shape, plus teachers 2x and 4x "
                 "wider than the student (B 8, C_s 64/256) on 7x7...64x64 maps",
        features=_union(*(s.features for s in suites), wider),
        logits=_union(*(s.logits for s in suites)),
        embeddings=_union(*(s.embeddings for s in suites)),
        maps=(MapShape(2, 19, 32, 64),), lmhead=(LmHeadShape(256, 128, 8000),))


# N tokens x hidden x vocab: a small Llama's lm_head to Llama 3's 128256 ids at 4096 tokens.
LLM_SHAPES = (LmHeadShape(1024, 512, 32000), LmHeadShape(2048, 1024, 32000),
              LmHeadShape(4096, 2048, 32000), LmHeadShape(1024, 2048, 128256),
              LmHeadShape(4096, 2048, 128256))

SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("tiny", "a few tiny shapes for the test suite (not a measurement)",
          features=(FeatureShape(2, 3, 5, 4, 4), FeatureShape(2, 3, 5, 6, 6),
                    FeatureShape(2, 4, 5, 4, 4)),
          logits=(LogitShape(2, 7), LogitShape(3, 7)),
          embeddings=(EmbeddingShape(4, 6, 8), EmbeddingShape(5, 6, 8)),
          maps=(MapShape(2, 3, 4, 6),),
          lmhead=(LmHeadShape(8, 16, 101),)),
    Suite("quick", "small CIFAR-like shapes, a minute or two on a small CPU; torch.compile "
                   "only when --providers names it",
          features=_features(8, spatial_sweep=(32, (8, 16)), channel_sweep=(16, (32, 64))),
          logits=(LogitShape(64, 100), LogitShape(256, 1000)),
          embeddings=(EmbeddingShape(32, 64, 128), EmbeddingShape(128, 64, 128)),
          maps=(MapShape(2, 19, 32, 64),),
          lmhead=(LmHeadShape(256, 128, 8000),),
          skip_by_default=("compile", "compile-max-autotune")),
    _CIFAR,
    _IMAGENET,
    Suite("large", "segmentation/detection maps up to 256x256 (8x8 -> 256x256 sweep), "
                   "LLM-vocabulary logits",
          features=_features(8, stages=((256, 128), (256, 256)),
                             spatial_sweep=(256, (8, 16, 32, 64, 128, 256)),
                             channel_sweep=(64, (64, 128, 256, 512))),
          logits=(LogitShape(128, 32000), LogitShape(4096, 32000), LogitShape(8192, 32000)),
          embeddings=(EmbeddingShape(1024, 512, 2048), EmbeddingShape(2048, 512, 2048)),
          maps=(MapShape(8, 19, 512, 1024),),
          lmhead=(LmHeadShape(1024, 512, 32000), LmHeadShape(4096, 2048, 128256))),
    _sweep(_CIFAR, _IMAGENET),
    Suite("llm", "language-model lm_head + KD (fused-linear-kd), tokens x hidden x vocab from "
                 "1024x512x32000 to 4096x2048x128256 (Llama 3's vocabulary); a row whose GEMM "
                 "floor exceeds --time-limit is skipped, so is a provider whose logits would not "
                 "fit in memory",
          features=(), logits=(), embeddings=(), lmhead=LLM_SHAPES),
)}

CLI_SUITES = ("quick", "cifar", "imagenet", "large", "sweep", "llm")

_SIZE = r"(\d+)(?:/(\d+))?"


def parse_shape(text: str, kind: str) -> Shape | None:
    """An explicit ``--shape`` for inputs of ``kind``, or None if it does not fit that kind.

    features: ``BxCxHxW`` or ``BxC_s/C_txHxW``; maps: ``BxCLASSESxHxW``; logits:
    ``BxCLASSES``; embeddings: ``BxD`` or ``BxD_s/D_t``; lmhead: ``NxHxV`` (tokens, hidden,
    vocab; the only kind of three sizes). Raises ValueError for text that is no shape at all.
    """
    parts = text.lower().replace(" ", "").split("x")
    if not all(re.fullmatch(_SIZE, p) for p in parts) or len(parts) not in (2, 3, 4):
        raise ValueError(f"--shape {text!r} is not a shape; write BxCxHxW, BxCs/CtxHxW "
                         "(features), BxCLASSES (logits), BxD / BxDs/Dt (embeddings) or "
                         "NxHxV (lmhead)")
    sizes = [re.fullmatch(_SIZE, p).groups() for p in parts]
    if any(second is not None for i, (_, second) in enumerate(sizes) if i != 1):
        raise ValueError(f"--shape {text!r}: only the channel/dim entry may be 'S/T'")
    first, second = int(sizes[1][0]), int(sizes[1][1] or sizes[1][0])
    if kind == "features" and len(parts) == 4:
        return FeatureShape(int(parts[0]), first, second, int(parts[2]), int(parts[3]))
    if kind == "maps" and len(parts) == 4 and sizes[1][1] is None:
        return MapShape(int(parts[0]), first, int(parts[2]), int(parts[3]))
    if kind == "lmhead" and len(parts) == 3 and sizes[1][1] is None:
        return LmHeadShape(int(parts[0]), first, int(parts[2]))
    if kind == "embeddings" and len(parts) == 2:
        return EmbeddingShape(int(parts[0]), first, second)
    if kind == "logits" and len(parts) == 2 and sizes[1][1] is None:
        return LogitShape(int(parts[0]), first)
    return None
