"""The wide ResNet-38 of Wu et al. ("Wider or Deeper", model A1), as PSA and EPS define it.

Pre-activation residual units, output stride 8: stages b2-b4 downsample by 2 each after the
3x3 ``conv1a``; b5 keeps the resolution with dilation 2 (its first 3x3 conv dilation 1); the
bottleneck units b6 / b7 use dilation 4 and channel dropout 0.3 / 0.5; the output is
``relu(bn7(x))`` with 4096 channels. Module names are the ones the authors' MXNet -> torch
renaming produces (see :func:`epsdist.models.mxnet_params.mxnet_to_resnet38_name`), so the
ImageNet ``.params`` file and the authors' torch checkpoints load by name.

Frozen as in the authors' ``resnet38_eps``: every BatchNorm runs in eval mode (running
statistics, even while the model trains) with its affine parameters fixed, and ``conv1a``,
``b2``, ``b2_1``, ``b2_2`` get no gradient.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .mxnet_params import load_mxnet_params, resnet38_state_dict_from_mxnet

__all__ = ["ResBlock", "BottleneckBlock", "ResNet38", "freeze_batchnorm", "freeze_module",
           "load_resnet38_imagenet", "load_state_dict_checked", "read_torch_state_dict",
           "report_missing"]


class ResBlock(nn.Module):
    """Pre-activation unit: BN-ReLU, then 3x3 -> BN-ReLU -> 3x3, plus a 1x1 projection of the
    activated input when the shape changes (else the identity of the raw input)."""

    def __init__(self, in_channels, mid_channels, out_channels, stride=1, first_dilation=None,
                 dilation=1):
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride,
                                       padding=first_dilation, dilation=first_dilation,
                                       bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x, get_x_bn_relu: bool = False):
        act = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(act)
        y = self.conv_branch2a(act)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))
        out = shortcut + y
        return (out, act) if get_x_bn_relu else out


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck unit (b6, b7): 1x1 (C/4) -> 3x3 dilated (C/2) -> 1x1 (C),
    with channel dropout before the last two convs; always a 1x1 projection shortcut."""

    def __init__(self, in_channels, out_channels, stride=1, dilation=1, dropout=0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3,
                                        padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x, get_x_bn_relu: bool = False):
        act = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(act)
        y = self.conv_branch2a(act)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        out = shortcut + y
        return (out, act) if get_x_bn_relu else out


def freeze_module(module: nn.Module) -> None:
    """requires_grad False for every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)


def freeze_batchnorm(root: nn.Module) -> None:
    """Every BatchNorm under ``root`` in eval mode with its affine parameters fixed."""
    for m in root.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


class ResNet38(nn.Module):
    """Wide ResNet-38 feature extractor, output stride 8, 4096 output channels.

    ``forward(x)`` -> ``relu(bn7(x))`` of shape (B, 4096, ceil(H/8), ceil(W/8));
    ``forward_features(x)`` -> ``{"conv4", "conv5", "conv6"}`` (the activated inputs of b5
    and b6, and the output), as the authors' ``forward_as_dict``.
    """

    out_channels = 4096
    output_stride = 8
    frozen = ("conv1a", "b2", "b2_1", "b2_2")  # the authors' not_training layers

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)

        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)

        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)

        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)

        self.b5 = ResBlock(512, 512, 1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)

        self.b6 = BottleneckBlock(1024, 2048, stride=1, dilation=4, dropout=0.3)
        self.b7 = BottleneckBlock(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)

        self._freeze()

    def _freeze(self) -> None:
        for name in self.frozen:
            freeze_module(getattr(self, name))
        freeze_batchnorm(self)

    def train(self, mode: bool = True):
        """Dropout follows ``mode``; BatchNorm always stays in eval mode (frozen statistics)."""
        super().train(mode)
        self._freeze()
        return self

    def forward_features(self, x) -> dict:
        x = self.conv1a(x)
        x = self.b2_2(self.b2_1(self.b2(x)))
        x = self.b3_2(self.b3_1(self.b3(x)))
        x = self.b4(x)
        x = self.b4_5(self.b4_4(self.b4_3(self.b4_2(self.b4_1(x)))))
        x, conv4 = self.b5(x, get_x_bn_relu=True)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6(x, get_x_bn_relu=True)
        x = self.b7(x)
        conv6 = F.relu(self.bn7(x))
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6}

    def forward(self, x):
        return self.forward_features(x)["conv6"]


# ----------------------------------------------------------------------------- weights


def read_torch_state_dict(path) -> dict:
    """A state dict from a torch checkpoint file: a bare state dict, or one wrapped in
    ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"module": ...}`` (DeepSpeed); a
    DataParallel ``module.`` prefix is removed."""
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"weights file '{path}' holds no state dict (a mapping from names to "
                         f"tensors, possibly under 'state_dict' or 'model')")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict_checked(module: nn.Module, state: dict, path, what: str):
    """``load_state_dict(strict=False)`` after checking shapes; returns (missing, unexpected).

    A tensor whose shape differs from the module's is an error naming the key and both shapes
    (``load_state_dict`` would otherwise fail with a generic message). ``num_batches_tracked``
    buffers (absent from MXNet / old torchvision files, unused with frozen BN) never count as
    missing.
    """
    own = module.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{what} weights '{path}' do not fit the model; shape mismatch for "
                         f"{len(bad)} tensor(s): " + "; ".join(bad))
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    return missing, list(result.unexpected_keys)


def report_missing(log, what: str, missing, prefix: str) -> None:
    """Log missing keys: outside ``prefix`` (the head) they are expected, inside a warning."""
    inside = [k for k in missing if k.startswith(prefix)]
    outside = [k for k in missing if not k.startswith(prefix)]
    if outside:
        log(f"{what}: not in the weights file, as expected (trained from scratch): "
            f"{', '.join(outside)}")
    if inside:
        log(f"WARNING: {what}: {len(inside)} backbone parameters are not in the weights file "
            f"and keep their random initialisation: {', '.join(inside)}")


def load_resnet38_imagenet(model: nn.Module, path, log=print):
    """Load ResNet-38 ImageNet weights into ``model`` (a ``ResNet38`` or a net whose
    ``.backbone`` is one) and return ``(missing, unexpected)`` keys.

    ``path``: the MXNet ``.params`` file of Wu et al. (renamed as the PSA/EPS authors do), or
    a torch state dict (``.pth``) with the same names (e.g. the authors' converted file).
    Missing keys are the parameters the file does not provide (for a full model: only the
    head); they are logged, as are unexpected keys (file entries that fit nowhere).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ResNet-38 weights file '{path}' not found")
    if path.endswith(".params"):
        state = resnet38_state_dict_from_mxnet(load_mxnet_params(path))
        kind = "MXNet"
    else:
        state = read_torch_state_dict(path)
        state = {k[len("backbone."):] if k.startswith("backbone.") else k: v
                 for k, v in state.items()}
        kind = "torch"
    prefix = "backbone." if isinstance(getattr(model, "backbone", None), ResNet38) else ""
    if prefix:
        state = {prefix + k: v for k, v in state.items()}
    missing, unexpected = load_state_dict_checked(model, state, path, "ResNet-38")
    loaded = len(state) - len(unexpected)
    log(f"ResNet-38: loaded {loaded} tensors from {kind} weights '{path}'")
    report_missing(log, "ResNet-38", missing, prefix)
    if unexpected:
        log(f"WARNING: ResNet-38: {len(unexpected)} entries of '{path}' match no parameter "
            f"(ignored): {', '.join(unexpected)}")
    return missing, unexpected
