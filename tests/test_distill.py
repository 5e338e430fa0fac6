import pytest
import torch
from torch import nn

import kdfast
from kdfast.distill import Distiller, Term


class TinyNet(nn.Module):
    def __init__(self, width: int, seed: int, inplace: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        return self.head(x.mean((2, 3)))


def test_distiller_matches_manual_computation_and_leaves_teacher_untouched():
    student, teacher = TinyNet(4, 0), TinyNet(8, 1)
    teacher.train()
    x = torch.randn(3, 1, 8, 8)
    distiller = Distiller(student, teacher, [Term(kdfast.ATLoss(), "conv2", weight=10.0)])
    with distiller:
        out, total, terms = distiller(x)
    assert teacher.training, "teacher mode is restored after the forward"
    assert not any(p.grad is not None for p in teacher.parameters())
    # Manual: the same features by calling the layers directly.
    teacher.eval()
    with torch.no_grad():
        t_feat = teacher.conv2(teacher.relu(teacher.bn1(teacher.conv1(x))))
    s_feat = student.conv2(student.relu(student.bn1(student.conv1(x))))
    expected = kdfast.functional.at_loss(s_feat, t_feat)
    torch.testing.assert_close(terms["ATLoss:conv2"], expected)
    torch.testing.assert_close(total, 10.0 * expected)
    torch.testing.assert_close(out, student(x))
    total.backward()
    assert student.conv1.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_hooks_are_removed_on_exit_and_forward_outside_raises():
    student, teacher = TinyNet(4, 0), TinyNet(4, 1)
    distiller = Distiller(student, teacher, [Term(kdfast.ATLoss(), "conv2")])
    with distiller:
        assert len(student.conv2._forward_hooks) == 1
    assert len(student.conv2._forward_hooks) == 0 and len(teacher.conv2._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="not attached"):
        distiller(torch.randn(1, 1, 8, 8))


def test_teacher_parameters_are_not_distiller_parameters():
    student, teacher = TinyNet(4, 0), TinyNet(4, 1)
    distiller = Distiller(student, teacher, [Term(kdfast.ATLoss(), "conv2")])
    ids = {id(p) for p in distiller.parameters()}
    assert ids == {id(p) for p in student.parameters()}
    assert not any(key.startswith("teacher") for key in distiller.state_dict())


def test_input_capture_of_inplace_relu_sees_the_pre_activation():
    student, teacher = TinyNet(4, 0, inplace=True), TinyNet(4, 1, inplace=True)
    captured = {}

    class Spy(nn.Module):
        def forward(self, s, t):
            captured["s"], captured["t"] = s.detach().clone(), t.detach().clone()
            return (s - t).pow(2).mean()

    distiller = Distiller(student, teacher, [Term(Spy(), "relu", capture="input")])
    x = torch.randn(2, 1, 8, 8)
    with distiller:
        distiller(x)
    expected = student.bn1(student.conv1(x))
    assert (captured["s"] < 0).any(), "pre-activation keeps its negative values"
    torch.testing.assert_close(captured["s"], expected.detach())


def test_bad_layer_names_and_terms():
    student, teacher = TinyNet(4, 0), TinyNet(4, 1)
    with pytest.raises(ValueError, match="student has no module named 'conv9'"):
        Distiller(student, teacher, [Term(kdfast.ATLoss(), "conv9")])
    with pytest.raises(ValueError, match="teacher has no module named 'layer1'"):
        Distiller(student, teacher, [Term(kdfast.ATLoss(), "conv2", "layer1")])
    with pytest.raises(ValueError, match="at least one"):
        Distiller(student, teacher, [])
    with pytest.raises(TypeError, match="nn.Module"):
        Term(kdfast.functional.at_loss, "conv2")
    with pytest.raises(ValueError, match="capture"):
        Term(kdfast.ATLoss(), "conv2", capture="grad")
    with pytest.raises(ValueError, match="unique"):
        Distiller(student, teacher, [Term(kdfast.ATLoss(), "conv2"),
                                     Term(kdfast.ATLoss(p=1.0), "conv2")])


def test_whole_model_output_with_empty_path():
    student, teacher = TinyNet(4, 0), TinyNet(4, 1)

    class MSE(nn.Module):
        def forward(self, s, t):
            return (s - t).pow(2).mean()

    distiller = Distiller(student, teacher, [Term(MSE(), "")])
    x = torch.randn(2, 1, 8, 8)
    with distiller:
        out, total, _ = distiller(x)
    with torch.no_grad():
        teacher.eval()
        expected = (student(x) - teacher(x)).pow(2).mean()
    torch.testing.assert_close(total, expected)


def test_build_creates_connectors_from_observed_shapes():
    student, teacher = TinyNet(4, 0), TinyNet(8, 1)
    fitnet, ab = kdfast.FitNetLoss(), kdfast.ABLoss()
    distiller = Distiller(student, teacher, [
        Term(fitnet, "conv2", name="fitnet"),
        Term(ab, "relu", capture="input", name="ab"),
        Term(kdfast.ATLoss(), "conv2", name="at"),
    ])
    x = torch.randn(2, 1, 8, 8)
    with distiller, pytest.raises(ValueError, match="connector"):
        distiller(x)  # 4 vs 8 channels and no connector yet
    assert distiller.build(x) == ["fitnet", "ab"]
    assert fitnet.connector is not None and ab.connector is not None
    assert fitnet.connector[0].in_channels == 4 and fitnet.connector[0].out_channels == 8
    connector_ids = {id(p) for p in fitnet.parameters()} | {id(p) for p in ab.parameters()}
    assert connector_ids <= {id(p) for p in distiller.parameters()}
    assert distiller.build(x) == [], "a second build keeps the connectors"
    with distiller:
        _, total, terms = distiller(x)
    total.backward()
    assert fitnet.connector[0].weight.grad is not None and ab.connector[0].weight.grad is not None
    assert set(terms) == {"fitnet", "ab", "at"}
