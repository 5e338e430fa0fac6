import warnings

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


class MSE(nn.Module):
    """(s - t)² mean, recording what it was given (detached copies)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, s, t):
        self.seen.append((s.detach().clone(), t.detach().clone()))
        return (s - t).pow(2).mean()


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: bn2's output is changed in place by the residual and ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def pre_residual(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.block = BasicBlock(width)
        self.head = nn.Linear(width, 10)
        self.double()

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_term_on_bn2_sees_the_pre_residual_values_and_its_gradient():
    student, teacher = ResNetLike(3, 0), ResNetLike(3, 1)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    loss = MSE()
    distiller = Distiller(student, teacher, [Term(loss, "block.bn2")])
    with distiller:
        _, total, _ = distiller(x)
    (seen_s, seen_t), = loss.seen
    with torch.no_grad():
        teacher.eval()
        expected_t = teacher.block.pre_residual(teacher.stem(x))
    assert (seen_t < 0).any() and (seen_s < 0).any(), "before the residual and the ReLU"
    torch.testing.assert_close(seen_t, expected_t)
    expected_s = student.block.pre_residual(student.stem(x))  # train mode, as in the forward
    torch.testing.assert_close(seen_s, expected_s.detach())
    params = list(student.parameters())
    expected_grads = torch.autograd.grad((expected_s - expected_t).pow(2).mean(), params,
                                         allow_unused=True)
    for name, got, want in zip([n for n, _ in student.named_parameters()],
                               torch.autograd.grad(total, params, allow_unused=True),
                               expected_grads, strict=True):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("model,student_layer,teacher_layer", [
    ("student", "block.bn2", "block.conv2"), ("teacher", "block.conv2", "block.bn2")])
def test_without_clone_a_capture_changed_in_place_raises(model, student_layer, teacher_layer):
    student, teacher = ResNetLike(3, 0), ResNetLike(3, 1)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    terms = [Term(MSE(), student_layer, teacher_layer, clone=False)]
    pattern = f"the {model}'s output of 'block.bn2' .*changed in place.*clone=True"
    with Distiller(student, teacher, terms) as distiller, pytest.raises(RuntimeError,
                                                                         match=pattern):
        distiller(x)
    with Distiller(student, teacher, [Term(MSE(), student_layer, teacher_layer)],
                   clone=False) as distiller, pytest.raises(RuntimeError, match=pattern):
        distiller(x)
    # Unchanged captures need no copy: conv2's output is read as the module returned it.
    loss = MSE()
    with Distiller(student, teacher, [Term(loss, "block.conv2", clone=False)]) as distiller:
        distiller(x)
    torch.testing.assert_close(loss.seen[0][0], student.block.conv2(
        student.block.relu(student.block.bn1(student.block.conv1(student.stem(x))))).detach())


class SharedReLU(nn.Module):
    """One ReLU module run twice per forward."""

    def __init__(self, width: int, seed: int, blocks: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else width, width, 3, padding=1)
                                   for i in range(blocks))
        self.relu = nn.ReLU()

    def features(self, x):
        outs = []
        for conv in self.convs:
            x = self.relu(conv(x))
            outs.append(x)
        return outs

    def forward(self, x):
        return self.features(x)[-1].mean((2, 3))


def test_a_module_called_twice_needs_an_explicit_call():
    student, teacher = SharedReLU(3, 0), SharedReLU(3, 1)
    x = torch.randn(2, 1, 5, 5)
    with Distiller(student, teacher, [Term(MSE(), "relu")]) as distiller, pytest.raises(
            RuntimeError, match=r"student's output of 'relu' ran 2 times.*call=0.*call=-1"):
        distiller(x)
    with torch.no_grad():
        s_outs, t_outs = student.features(x), teacher.features(x)
    for call, index in ((0, 0), (1, 1), (-1, 1), (-2, 0)):
        loss = MSE()
        with Distiller(student, teacher, [Term(loss, "relu", call=call)]) as distiller:
            _, total, _ = distiller(x)
        torch.testing.assert_close(loss.seen[0][0], s_outs[index], msg=f"call={call}")
        torch.testing.assert_close(loss.seen[0][1], t_outs[index], msg=f"call={call}")
        torch.testing.assert_close(total, (s_outs[index] - t_outs[index]).pow(2).mean())
    with Distiller(student, teacher, [Term(MSE(), "relu", call="all")]) as distiller:
        _, total, _ = distiller(x)
    expected = sum((s - t).pow(2).mean() for s, t in zip(s_outs, t_outs, strict=True)) / 2
    torch.testing.assert_close(total, expected)
    for call in (2, -3):
        with Distiller(student, teacher, [Term(MSE(), "relu", call=call)]) as distiller, \
                pytest.raises(RuntimeError, match=f"call={call} but the student's .* ran 2"):
            distiller(x)
    with Distiller(student, SharedReLU(3, 1, blocks=3), [Term(MSE(), "relu", call="all")]
                   ) as distiller, pytest.raises(RuntimeError, match="ran 2 times and the "
                                                                     "teacher's 'relu' 3"):
        distiller(x)
    for bad in ("last", True, 1.0):
        with pytest.raises(ValueError, match="Term.call must be"):
            Term(MSE(), "relu", call=bad)
    with pytest.raises(TypeError, match="Term.clone must be"):
        Term(MSE(), "relu", clone="yes")


def test_nested_with_is_reentrant():
    student, teacher = TinyNet(4, 0), TinyNet(4, 1)
    distiller = Distiller(student, teacher, [Term(kdfast.ATLoss(), "conv2")])
    x = torch.randn(1, 1, 8, 8)
    with distiller:
        with distiller:
            assert len(student.conv2._forward_hooks) == 1
            distiller(x)
        distiller(x)  # the inner exit keeps the hooks
        distiller.build(x)  # so does build()'s own attach/detach
        distiller(x)
    assert len(student.conv2._forward_hooks) == 0 and len(teacher.conv2._forward_hooks) == 0
    distiller.attach()
    distiller.attach()
    distiller.detach()
    distiller(x)
    distiller.detach()
    distiller.detach()  # one too many: nothing to undo
    with pytest.raises(RuntimeError, match="not attached"):
        distiller(x)


def lazy_connector_distiller(student_seed: int):
    student, teacher = TinyNet(4, student_seed), TinyNet(8, 1)
    return Distiller(student, teacher, [
        Term(kdfast.FitNetLoss(), "conv2", name="fitnet"),          # 1x1 conv, 4 -> 8 channels
        Term(kdfast.FitNetLoss(relu=False), "bn1", "conv2", name="fitnet-stride"),  # 8x8 -> 4x4
        Term(kdfast.ABLoss(), "relu", capture="input", name="ab"),
    ])


def test_checkpoint_loads_into_a_fresh_distiller_without_an_example_batch():
    import io

    x = torch.randn(3, 1, 8, 8)
    saved = lazy_connector_distiller(0)
    assert saved.build(x) == ["fitnet", "fitnet-stride", "ab"]
    optimizer = torch.optim.SGD(saved.parameters(), lr=0.1)
    with saved:  # one step, so that the connectors' weights and BN statistics move
        saved(x)[1].backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    fresh = lazy_connector_distiller(5)
    fresh.load_state_dict(torch.load(buffer))  # weights_only loading, strict
    assert isinstance(fresh.losses[1].connector[0], nn.Conv2d)
    assert fresh.losses[1].connector[0].stride == (2, 2), "not a valid 3x3 conv: same weights"
    saved.eval(), fresh.eval()
    with saved, fresh:
        (out, total, terms), (fresh_out, fresh_total, fresh_terms) = saved(x), fresh(x)
    torch.testing.assert_close(fresh_out, out)
    torch.testing.assert_close(fresh_total, total)
    assert fresh_terms.keys() == terms.keys()

    double = lazy_connector_distiller(5)
    double.student.double()
    double.load_state_dict(saved.state_dict())
    assert all(p.dtype == torch.float64 for p in double.parameters()), "the student's dtype"


def test_loading_a_connector_built_differently_raises():
    x = torch.randn(3, 1, 8, 8)
    saved = lazy_connector_distiller(0)
    saved.build(x)
    other = lazy_connector_distiller(0)
    other.losses[1]._set_connector((8, 6, 6), (8, 4, 4))  # a valid 3x3 conv, same weights
    with pytest.raises(RuntimeError, match=r"losses.1.connector: the checkpoint's was built "
                                           r"for \(student, teacher\) = \(\(4, 8, 8\)"):
        other.load_state_dict(saved.state_dict())


def test_checkpoint_without_the_connector_entry_still_loads():
    loss = kdfast.FitNetLoss(4, 8)
    state = {k: v for k, v in loss.state_dict().items() if not k.endswith("_extra_state")}
    kdfast.FitNetLoss(4, 8).load_state_dict(state)


def test_build_after_parameters_were_handed_out_warns():
    x = torch.randn(2, 1, 8, 8)
    late = lazy_connector_distiller(0)
    torch.optim.SGD(late.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"build\(\) created connector parameters for the "
                                         r"terms \['fitnet', 'fitnet-stride', 'ab'\] after"):
        late.build(x)
    checkpoint = late.state_dict()
    fresh = lazy_connector_distiller(0)
    torch.optim.SGD(fresh.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"load_state_dict\(\) created connector"):
        fresh.load_state_dict(checkpoint)
    in_order = lazy_connector_distiller(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        in_order.build(x)
        torch.optim.SGD(in_order.parameters(), lr=0.1)
        in_order.build(x)  # builds nothing more
