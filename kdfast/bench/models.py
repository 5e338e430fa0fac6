"""Teacher/student pairs of the training-step benchmark (``python -m kdfast.bench --steps``),
small ResNet-style definitions of our own (no torchvision).

* :func:`cifar_resnet`: the CIFAR ResNets of the KD literature (He et al. 2016, section 4.2,
  as RepDistiller builds them): a 3×3 stem, three stages of ``n`` basic blocks at widths
  16/32/64 and strides 1/2/2, global average pooling, a linear classifier; depth 6n + 2
  (ResNet-110: n = 18, ResNet-32: n = 5).
* :func:`dense_encoder`: a two-stage encoder of a dense-prediction network: a 3×3 stem at the
  input resolution, one stage of bottleneck blocks (ResNet-50's, expansion 4) at half of it,
  and a 1×1-conv "segmentation head" on the last stage.

Both return ``(*stage_features, logits)``: the tensors the distillation losses read. The
forward of every model is this tuple, so a loss set addresses its inputs by position.

:data:`SCALES` names the pairs, the batch and the input of each benchmark scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """relu(x' + conv-bn-relu-conv-bn(x)), x' a strided 1×1 conv-bn where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c_in, c_out, 3, stride), nn.ReLU(inplace=True),
                                  _conv_bn(c_out, c_out, 3))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else _conv_bn(c_in, c_out, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """relu(x' + 1×1 → 3×3 (strided) → 1×1 conv-bn), inner width c_out / 4."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        mid = max(c_out // 4, 1)
        self.body = nn.Sequential(_conv_bn(c_in, mid, 1), nn.ReLU(inplace=True),
                                  _conv_bn(mid, mid, 3, stride), nn.ReLU(inplace=True),
                                  _conv_bn(mid, c_out, 1))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else _conv_bn(c_in, c_out, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _stage(block: type[nn.Module], c_in: int, c_out: int, blocks: int,
           stride: int) -> nn.Sequential:
    return nn.Sequential(block(c_in, c_out, stride),
                         *(block(c_out, c_out, 1) for _ in range(blocks - 1)))


class CifarResNet(nn.Module):
    def __init__(self, blocks: int, widths: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, widths[0], 3), nn.ReLU(inplace=True))
        c_in, stages = widths[0], []
        for width, stride in zip(widths, (1, 2, 2), strict=True):
            stages.append(_stage(BasicBlock, c_in, width, blocks, stride))
            c_in = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return (*features, self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def cifar_resnet(blocks: int, widths: tuple[int, int, int] = (16, 32, 64),
                 classes: int = 100) -> CifarResNet:
    """ResNet-(6·blocks + 2) for 32×32 inputs; forward: (stage1, stage2, stage3, logits)."""
    return CifarResNet(blocks, widths, classes)


class DenseEncoder(nn.Module):
    def __init__(self, widths: tuple[int, int], blocks: int, classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, widths[0], 3), nn.ReLU(inplace=True))
        self.stage = _stage(Bottleneck, widths[0], widths[1], blocks, 2)
        self.head = nn.Conv2d(widths[1], classes, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stem = self.stem(x)
        stage = self.stage(stem)
        return stem, stage, self.head(stage)


def dense_encoder(widths: tuple[int, int], blocks: int, classes: int = 19) -> DenseEncoder:
    """Forward: (stem map at the input size, stage map at half of it, head logits (B, classes)
    at the stage's size)."""
    return DenseEncoder(widths, blocks, classes)


@dataclass(frozen=True)
class Scale:
    """One benchmark scale: which losses it takes (``family``), the pair, the batch."""
    name: str
    family: str                        # "cifar" (classification) or "dense" (segmentation)
    teacher: Callable[[], nn.Module]
    student: Callable[[], nn.Module]
    batch: int
    size: int                          # H = W of the input images
    classes: int
    description: str

    def inputs(self, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images (B, 3, size, size) and labels: (B,) classes for ``cifar``, (B, h, w)
        per-pixel classes at the head's size for ``dense``."""
        generator = torch.Generator(device=device).manual_seed(seed)
        images = torch.randn(self.batch, 3, self.size, self.size, device=device,
                             generator=generator)
        label_shape = (self.batch,) if self.family == "cifar" else (
            self.batch, self.size // 2, self.size // 2)
        labels = torch.randint(0, self.classes, label_shape, device=device, generator=generator)
        return images, labels


SCALES: dict[str, Scale] = {scale.name: scale for scale in (
    Scale("cifar", "cifar", lambda: cifar_resnet(18), lambda: cifar_resnet(5), 64, 32, 100,
          "ResNet-110 teacher, ResNet-32 student (widths 16/32/64), 32x32, B 64, 100 classes"),
    Scale("dense", "dense", lambda: dense_encoder((64, 256), 3),
          lambda: dense_encoder((32, 128), 1), 8, 128, 19,
          "encoder teacher widths 64/256 (3 bottlenecks), student 32/128 (1), maps 128x128 "
          "and 64x64, 1x1 head to 19 classes at 64x64, B 8"),
    # For the tests: the same families at a size that runs in milliseconds.
    Scale("tiny", "cifar", lambda: cifar_resnet(2, (4, 8, 8), 10),
          lambda: cifar_resnet(1, (4, 8, 8), 10), 2, 8, 10, "tests: ResNet-14/8, widths 4/8/8"),
    Scale("tiny-dense", "dense", lambda: dense_encoder((8, 16), 2, 5),
          lambda: dense_encoder((4, 8), 1, 5), 2, 16, 5, "tests: encoder widths 8/16 and 4/8"),
)}
