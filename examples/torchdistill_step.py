"""One torchdistill-style distillation step with kdfast's losses from a YAML config.

Builds the criterion from ``examples/torchdistill_kdfast.yaml`` through torchdistill's own
registry (``get_high_level_loss``) after ``import kdfast.compat.torchdistill`` has registered
kdfast's losses, captures the student's and teacher's module ios with forward hooks into the
``io_dict`` shape torchdistill's hooks produce (``{path: {"input": x, "output": y}}``, path
``"."`` the whole model), and runs one SGD step of a tiny random student against a tiny random
teacher. ``torchdistill.core`` (its training loop) needs torchvision; only its
``losses`` package is used here.

    pip install --no-deps torchdistill pyyaml
    python examples/torchdistill_step.py [--config examples/torchdistill_kdfast.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from torch import nn
from torchdistill.losses.registry import get_high_level_loss

import kdfast.compat.torchdistill  # noqa: F401  (registers KDFastKDLoss, KDFastATLoss, ...)

CONFIG = Path(__file__).with_name("torchdistill_kdfast.yaml")


class TinyNet(nn.Module):
    """Two conv blocks (block2 halves the map) and a linear head on 3 x 16 x 16 inputs."""

    def __init__(self, width: int, num_classes: int = 10) -> None:
        super().__init__()
        self.block2 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                    nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block3(self.block2(x)).mean(dim=(2, 3)))


def module_paths(criterion_config: dict) -> tuple[set[str], set[str]]:
    """The module paths the sub-terms read, student side and teacher side."""
    student, teacher = set(), set()
    for term in criterion_config["kwargs"]["sub_terms"].values():
        for key, value in term["criterion"].get("kwargs", {}).items():
            if key.endswith("module_path"):
                (student if key.startswith("student") else teacher).add(value)
        wrapper = term.get("criterion_wrapper", {}).get("kwargs", {})
        for side in ("input", "target"):
            if "module_path" in wrapper.get(side, {}):
                from_teacher = wrapper[side].get("is_from_teacher", False)
                (teacher if from_teacher else student).add(wrapper[side]["module_path"])
    return student, teacher


def capture_io(model: nn.Module, paths: set[str], io_dict: dict) -> None:
    """Forward hooks storing each module's input and output as torchdistill's do."""
    for path in paths:
        module = model if path == "." else model.get_submodule(path)

        def hook(_module, inputs, output, path=path):
            io_dict[path] = {"input": inputs[0] if len(inputs) == 1 else inputs,
                             "output": output}

        module.register_forward_hook(hook)


def main(config_path: Path = CONFIG, seed: int = 0) -> float:
    torch.manual_seed(seed)
    criterion_config = yaml.safe_load(config_path.read_text())["criterion"]
    criterion = get_high_level_loss(criterion_config)
    print(criterion)

    teacher, student = TinyNet(width=16).eval(), TinyNet(width=8)
    student_io, teacher_io = {}, {}
    student_paths, teacher_paths = module_paths(criterion_config)
    capture_io(student, student_paths, student_io)
    capture_io(teacher, teacher_paths, teacher_io)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)

    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    with torch.no_grad():
        teacher(images)
    student(images)
    loss = criterion({"student": student_io, "teacher": teacher_io}, {}, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    main(parser.parse_args().config)
