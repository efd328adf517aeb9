"""torchvision ResNet-50 / ResNet-101 as dilated feature extractors (output stride 8 or 16).

The modules keep torchvision's names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a
torchvision ImageNet checkpoint loads by name (its ``fc.*`` classifier is left out). Frozen
like the ResNet-38 recipe: every BatchNorm in eval mode with fixed affine parameters, and the
stem (``conv1``, ``bn1``, ``layer1``) without gradient.
"""
from __future__ import annotations

import os

import torchvision
from torch import nn

from .resnet38 import (freeze_batchnorm, freeze_module, load_state_dict_checked,
                       read_torch_state_dict, report_missing)

__all__ = ["TorchvisionResNet", "DILATION", "load_torchvision_resnet"]

# output stride -> torchvision's replace_stride_with_dilation for layer2..layer4
DILATION = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


class TorchvisionResNet(nn.Module):
    """ResNet-50/101 up to ``layer4`` (2048 channels) at output stride 8, 16 or 32."""

    out_channels = 2048
    frozen = ("conv1", "bn1", "layer1")

    def __init__(self, depth: int = 50, output_stride: int = 8):
        super().__init__()
        if depth not in (50, 101):
            raise ValueError(f"TorchvisionResNet: depth must be 50 or 101, got {depth}")
        if output_stride not in DILATION:
            raise ValueError(f"model.output_stride: resnet{depth} supports "
                             f"{sorted(DILATION)}, got {output_stride}")
        ctor = torchvision.models.resnet50 if depth == 50 else torchvision.models.resnet101
        net = ctor(weights=None, replace_stride_with_dilation=DILATION[output_stride])
        self.depth, self.output_stride = depth, output_stride
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (net.layer1, net.layer2,
                                                              net.layer3, net.layer4)
        self._freeze()

    def _freeze(self) -> None:
        for name in self.frozen:
            freeze_module(getattr(self, name))
        freeze_batchnorm(self)

    def train(self, mode: bool = True):
        """BatchNorm always stays in eval mode (frozen statistics)."""
        super().train(mode)
        self._freeze()
        return self

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_torchvision_resnet(model: nn.Module, path, log=print):
    """Load a torchvision ResNet checkpoint (state dict ``.pth``, possibly wrapped in
    ``{"state_dict": ...}`` / ``{"model": ...}``) into ``model`` (a ``TorchvisionResNet`` or a
    net whose ``.backbone`` is one). Returns ``(missing, unexpected)``; the checkpoint's
    ``fc.*`` classifier is expected and not listed as unexpected."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torchvision ResNet weights file '{path}' not found")
    state = read_torch_state_dict(path)
    state = {k[len("backbone."):] if k.startswith("backbone.") else k: v
             for k, v in state.items()}
    classifier = [k for k in state if k.startswith("fc.")]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    prefix = "backbone." if isinstance(getattr(model, "backbone", None),
                                       TorchvisionResNet) else ""
    if prefix:
        state = {prefix + k: v for k, v in state.items()}
    what = f"ResNet-{getattr(getattr(model, 'backbone', model), 'depth', '')}".rstrip("-")
    missing, unexpected = load_state_dict_checked(model, state, path, what)
    log(f"{what}: loaded {len(state) - len(unexpected)} tensors from torchvision weights "
        f"'{path}'" + (f" (ImageNet classifier {', '.join(classifier)} not used)"
                       if classifier else ""))
    report_missing(log, what, missing, prefix)
    if unexpected:
        log(f"WARNING: {what}: {len(unexpected)} entries of '{path}' match no parameter "
            f"(ignored): {', '.join(unexpected)}")
    return missing, unexpected
