"""A RepDistiller-style training step with kdfast's drop-in ``distiller_zoo``.

RepDistiller's ``train_student.py`` set-up and ``helper/loops.py`` step, unchanged but for the
import: the criteria are built into ``criterion_list = [cls, div, kd]``, the connectors and
embedding heads into ``module_list`` / ``trainable_list``, and each step takes the per-layer
feature lists of ``model(x, is_feat=True)``. Random CIFAR-shaped data (3x32x32, 100 classes)
and two tiny ResNet-shaped nets; one SGD step per distillation method, on a CPU in seconds.

    python examples/repdistiller_step.py [--distill kd attention crd ...]
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from torch import nn

import kdfast
from kdfast.compat.repdistiller import *  # noqa: F403  (was: from distiller_zoo import *)
from kdfast.compat.repdistiller import CRDLoss  # was: from crd.criterion import CRDLoss

N_CLASSES, N_DATA = 100, 64
DISTILLS = ("kd", "hint", "attention", "nst", "similarity", "rkd", "pkt", "kdsvd",
            "correlation", "vid", "crd", "abound", "fsp")


class TinyNet(nn.Module):
    """A stem and three stages at 32, 16 and 8 pixels, then global pooling and a classifier.

    ``forward(x, is_feat=True, preact=False)`` returns ``([stem, stage1, stage2, stage3,
    pooled], logits)`` as RepDistiller's CIFAR models do (the stage maps before their ReLU
    with ``preact=True``)."""

    def __init__(self, width: int, num_classes: int = N_CLASSES) -> None:
        super().__init__()
        widths = (width, width, 2 * width, 4 * width)
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1),
                          nn.BatchNorm2d(c_out))
            for i, (c_in, c_out) in enumerate(zip(widths, widths[1:], strict=False)))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x, is_feat=False, preact=False):
        feats = [torch.relu(self.stem(x))]
        for stage in self.stages:
            out = stage(feats[-1] if not preact or len(feats) == 1 else torch.relu(feats[-1]))
            feats.append(out if preact else torch.relu(out))
        pooled = torch.relu(feats[-1]).mean(dim=(2, 3))
        logits = self.fc(pooled)
        return (feats + [pooled], logits) if is_feat else logits


def make_opt(distill: str) -> SimpleNamespace:
    """The fields of RepDistiller's ``parse_option`` that the loss set-up and step read."""
    return SimpleNamespace(distill=distill, kd_T=4.0, gamma=1.0, alpha=0.9, beta=0.0 if
                           distill in ("kd", "abound", "fsp") else 1.0, hint_layer=2,
                           feat_dim=16, nce_k=8, nce_t=0.07, nce_m=0.5)


def build(opt, model_s: nn.Module, model_t: nn.Module, n_data: int = N_DATA):
    """train_student.py's ``main`` up to the optimiser: (module_list, criterion_list,
    trainable_list)."""
    data = torch.randn(2, 3, 32, 32)
    model_t.eval()
    model_s.eval()
    feat_t, _ = model_t(data, is_feat=True)
    feat_s, _ = model_s(data, is_feat=True)
    module_list = nn.ModuleList([model_s])
    trainable_list = nn.ModuleList([model_s])
    criterion_cls = nn.CrossEntropyLoss()
    criterion_div = DistillKL(opt.kd_T)  # noqa: F405
    extra = []  # modules appended to module_list (and trained)
    if opt.distill == "kd":
        criterion_kd = DistillKL(opt.kd_T)  # noqa: F405
    elif opt.distill == "hint":
        criterion_kd = HintLoss()  # noqa: F405
        extra = [kdfast.make_connector(feat_s[opt.hint_layer].shape,
                                       feat_t[opt.hint_layer].shape)]  # RepDistiller's ConvReg
    elif opt.distill == "crd":
        opt.s_dim, opt.t_dim, opt.n_data = feat_s[-1].shape[1], feat_t[-1].shape[1], n_data
        criterion_kd = CRDLoss(opt)
        extra = [criterion_kd.embed_s, criterion_kd.embed_t]
    elif opt.distill == "correlation":
        criterion_kd = Correlation()  # noqa: F405
        extra = [nn.Linear(feat_s[-1].shape[1], opt.feat_dim),  # RepDistiller's LinearEmbed
                 nn.Linear(feat_t[-1].shape[1], opt.feat_dim)]
    elif opt.distill == "vid":
        criterion_kd = nn.ModuleList([VIDLoss(s.shape[1], t.shape[1], t.shape[1])  # noqa: F405
                                      for s, t in zip(feat_s[1:-1], feat_t[1:-1], strict=True)])
        trainable_list.append(criterion_kd)
    elif opt.distill == "abound":
        criterion_kd = ABLoss(len(feat_s[1:-1]))  # noqa: F405
        extra = [nn.ModuleList(  # RepDistiller's Connector: 1x1 conv + BN per layer
            kdfast.make_connector(s.shape[1], t.shape[1], relu=False)
            for s, t in zip(feat_s[1:-1], feat_t[1:-1], strict=True))]
    elif opt.distill == "fsp":
        criterion_kd = FSP([s.shape for s in feat_s[:-1]],  # noqa: F405
                           [t.shape for t in feat_t[:-1]])
    else:
        criterion_kd = {"attention": Attention, "nst": NSTLoss,  # noqa: F405
                        "similarity": Similarity, "rkd": RKDLoss, "pkt": PKT,  # noqa: F405
                        "kdsvd": KDSVD}[opt.distill]()  # noqa: F405
    for module in extra:
        module_list.append(module)
        trainable_list.append(module)
    criterion_list = nn.ModuleList([criterion_cls, criterion_div, criterion_kd])
    module_list.append(model_t)
    return module_list, criterion_list, trainable_list


def kd_term(opt, module_list, criterion_kd, feat_s, feat_t, index, contrast_idx):
    """``loss_kd`` of train_distill (for abound and fsp: the loss of their init stage)."""
    if opt.distill == "kd":
        return 0
    if opt.distill == "hint":
        return criterion_kd(module_list[1](feat_s[opt.hint_layer]), feat_t[opt.hint_layer])
    if opt.distill == "crd":
        return criterion_kd(feat_s[-1], feat_t[-1], index, contrast_idx)
    if opt.distill == "correlation":
        return criterion_kd(module_list[1](feat_s[-1]), module_list[2](feat_t[-1]))
    if opt.distill in ("rkd", "pkt"):
        return criterion_kd(feat_s[-1], feat_t[-1])
    if opt.distill == "similarity":
        return sum(criterion_kd([feat_s[-2]], [feat_t[-2]]))
    if opt.distill == "vid":
        layers = zip(feat_s[1:-1], feat_t[1:-1], criterion_kd, strict=True)
        return sum(c(f_s, f_t) for f_s, f_t, c in layers)
    if opt.distill == "abound":
        connectors = module_list[1]
        return sum(criterion_kd([c(f) for c, f in zip(connectors, feat_s[1:-1], strict=True)],
                                feat_t[1:-1]))
    if opt.distill == "fsp":
        return sum(criterion_kd(feat_s[:-1], feat_t[:-1]))
    return sum(criterion_kd(feat_s[1:-1], feat_t[1:-1]))  # attention, nst, kdsvd


def train_step(opt, module_list, criterion_list, optimizer, batch):
    """One iteration of train_distill: returns (loss, loss_kd) as floats."""
    for module in module_list:
        module.train()
    module_list[-1].eval()
    criterion_cls, criterion_div, criterion_kd = criterion_list
    model_s, model_t = module_list[0], module_list[-1]
    input, target, index, contrast_idx = batch
    preact = opt.distill == "abound"
    feat_s, logit_s = model_s(input, is_feat=True, preact=preact)
    with torch.no_grad():
        feat_t, logit_t = model_t(input, is_feat=True, preact=preact)
        feat_t = [f.detach() for f in feat_t]
    loss_cls = criterion_cls(logit_s, target)
    loss_div = criterion_div(logit_s, logit_t)
    loss_kd = kd_term(opt, module_list, criterion_kd, feat_s, feat_t, index, contrast_idx)
    loss = opt.gamma * loss_cls + opt.alpha * loss_div + opt.beta * loss_kd
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), float(torch.as_tensor(loss_kd).detach().sum())


def random_batch(opt, batch_size: int = 8, seed: int = 0):
    """CIFAR-shaped inputs, labels, sample indices and (B, K + 1) contrast indices whose first
    column is the sample's own index (RepDistiller's CIFAR100InstanceSample)."""
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(batch_size, 3, 32, 32, generator=generator)
    target = torch.randint(N_CLASSES, (batch_size,), generator=generator)
    index = torch.randperm(N_DATA, generator=generator)[:batch_size]
    contrast_idx = torch.randint(N_DATA, (batch_size, opt.nce_k + 1), generator=generator)
    contrast_idx[:, 0] = index
    return input, target, index, contrast_idx


def main(distills=DISTILLS) -> dict[str, float]:
    losses = {}
    for distill in distills:
        torch.manual_seed(0)
        opt = make_opt(distill)
        # KDSVD and FSP compare the channels one to one (RepDistiller too): equal widths
        model_s, model_t = TinyNet(4), TinyNet(4 if distill in ("kdsvd", "fsp") else 8)
        module_list, criterion_list, trainable_list = build(opt, model_s, model_t)
        optimizer = torch.optim.SGD(trainable_list.parameters(), lr=0.05, momentum=0.9,
                                    weight_decay=5e-4)
        loss, loss_kd = train_step(opt, module_list, criterion_list, optimizer,
                                   random_batch(opt))
        losses[distill] = loss
        print(f"{distill:12s} loss {loss:.4f}  loss_kd {loss_kd:.4e}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distill", nargs="+", default=list(DISTILLS), choices=DISTILLS)
    main(parser.parse_args().distill)
