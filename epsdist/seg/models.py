"""Segmentation networks: DeepLab-v2 (the network of the EPS paper), torchvision's DeepLab-v3,
and a small DeepLab-v2 on the tiny backbone for the synthetic recipe.

    model = build_seg_model(cfg.model, num_classes=cfg.data.num_classes, log=print)
    logits = model(images)          # (B, C+1, ceil(H / os), ceil(W / os)); 0 = background

* ``deeplabv2`` + ``resnet101`` (or ``resnet50``): torchvision's ResNet dilated to output
  stride 8 (layer3 dilation 2, layer4 dilation 4; 16 optional) -- the stage-1 backbone
  builder of ``epsdist/models/resnets.py`` -- and the DeepLab-v2 ASPP head: four parallel 3x3
  convolutions with dilation 6, 12, 18 and 24 from the 2048 backbone channels straight to the
  C+1 classes, with bias, summed (Chen et al., TPAMI 2017, "ASPP-L"). As in DeepLab-v2, every
  BatchNorm is frozen (ImageNet statistics and affine parameters, eval mode in training too:
  batches of 5 per GPU are too small for batch statistics), every convolution trains (the
  stage-1 backbone also freezes conv1 and layer1; DeepLab-v2 does not), and the head is
  initialised N(0, 0.01) with zero bias.
* ``deeplabv2`` + ``tiny``: ``epsdist/models/tiny.py``'s backbone (output stride 8, 128
  channels) and the same ASPP head with the config's (smaller) rates; trains from scratch in
  minutes on CPUs.
* ``deeplabv3`` + ``resnet101`` (or ``resnet50``): ``torchvision.models.segmentation.
  deeplabv3_resnet101(weights=None, weights_backbone=None)`` -- its dilated ResNet (output
  stride 8) and its ``DeepLabHead`` (ASPP with rates 12/24/36 and image pooling, 3x3 conv,
  BatchNorm, 1x1 classifier). The backbone's BatchNorm is frozen like DeepLab-v2's; the head's
  trains (SyncBatchNorm across CUDA ranks, ``model.sync_bn``). torchvision's final upsampling
  is left out: every model here returns logits at its output stride, and the loss / inference
  upsample them.

ImageNet weights (``model.weights``): a torchvision ResNet checkpoint, read by the stage-1
loader (``load_torchvision_resnet``: by name, ``fc.*`` left out, missing / unexpected keys
reported); for ``tiny`` a torch state dict of the backbone (e.g. a stage-1 export).

Optimiser groups: :func:`epsdist.models.param_groups` (the head is ``from_scratch_modules``):
backbone weights 1x lr with weight decay, backbone biases / norms 2x without, head weights 10x
with weight decay ("10x for the classifier"), head biases / norms 20x without -- the
DeepLab-v2 Caffe recipe (fc8 ``lr_mult`` 10 / 20, bias ``decay_mult`` 0). The frozen
BatchNorms are in no group. Models never touch torch.distributed.
"""
from __future__ import annotations


import torch
from torch import nn

from ..models import count_parameters, load_backbone_weights, weights_path
from ..models.resnet38 import freeze_batchnorm
from ..models.resnets import TorchvisionResNet, load_torchvision_resnet
from ..models.tiny import TinyBackbone

__all__ = ["ASPPv2", "SegNet", "SegResNet", "build_seg_model", "build_seg_backbone"]


class SegResNet(TorchvisionResNet):
    """The stage-1 dilated torchvision ResNet with DeepLab's freezing: BatchNorm only (every
    convolution trains)."""

    frozen = ()


class ASPPv2(nn.Module):
    """DeepLab-v2 atrous spatial pyramid pooling: ``sum_r conv3x3_dilation_r(x)``, each branch
    straight to the class logits (with bias)."""

    def __init__(self, in_channels: int, num_maps: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_maps, 3, padding=r, dilation=r, bias=True)
            for r in self.rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out

    def extra_repr(self) -> str:
        return f"rates={self.rates}"


class SegNet(nn.Module):
    """``head(backbone(image))``: (B, K, h, w) logits, K = C+1 (``num_maps``; 0 = background),
    h = ceil(H / output_stride). Attributes ``num_classes`` (C), ``num_maps``,
    ``output_stride``, ``arch``, ``backbone_name``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_classes: int,
                 output_stride: int, arch: str, backbone_name: str):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone, self.head = backbone, head
        self.num_classes, self.num_maps = int(num_classes), int(num_classes) + 1
        self.output_stride, self.arch, self.backbone_name = output_stride, arch, backbone_name
        self._freeze()

    @property
    def from_scratch_modules(self) -> list:
        """The classifier (10x lr); the rest is the (ImageNet-initialised) backbone."""
        return [self.head]

    def _freeze(self) -> None:
        if self.backbone_name != "tiny":          # the tiny backbone's GroupNorm trains
            freeze_batchnorm(self.backbone)

    def train(self, mode: bool = True):
        """The backbone's BatchNorm stays in eval mode (frozen statistics)."""
        super().train(mode)
        self._freeze()
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(image)
        if isinstance(feat, dict):                # torchvision's IntermediateLayerGetter
            feat = feat["out"]
        return self.head(feat)

    def extra_repr(self) -> str:
        return (f"arch={self.arch}, backbone={self.backbone_name}, num_maps={self.num_maps}, "
                f"output_stride={self.output_stride}")


def build_seg_backbone(name: str, output_stride: int = 8) -> nn.Module:
    """The DeepLab-v2 backbone ``name`` (randomly initialised)."""
    if name in ("resnet50", "resnet101"):
        return SegResNet(int(name[len("resnet"):]), output_stride)
    if name == "tiny":
        if output_stride != 8:
            raise ValueError(f"model.output_stride: tiny has output stride 8, got {output_stride}")
        return TinyBackbone()
    raise ValueError(f"model.backbone: expected resnet50, resnet101 or tiny, got {name!r}")


def _deeplabv3(cfg, num_maps: int) -> SegNet:
    from torchvision.models import segmentation
    ctor = {"resnet50": segmentation.deeplabv3_resnet50,
            "resnet101": segmentation.deeplabv3_resnet101}.get(cfg.backbone)
    if ctor is None or cfg.output_stride != 8:
        raise ValueError(f"model.arch deeplabv3: backbone resnet50/resnet101 at output stride "
                         f"8, got {cfg.backbone} at {cfg.output_stride}")
    net = ctor(weights=None, weights_backbone=None, num_classes=num_maps, aux_loss=False)
    return SegNet(net.backbone, net.classifier, num_maps - 1, 8, "deeplabv3", cfg.backbone)


def build_seg_model(cfg, num_classes: int, log=print) -> SegNet:
    """The segmentation network for ``cfg`` (a ``SegModelConfig``) with C = ``num_classes``
    foreground classes (C+1 outputs), backbone weights loaded from ``cfg.weights`` unless
    "none" (``FileNotFoundError`` naming ``model.weights`` when the file is missing)."""
    if cfg.arch == "deeplabv3":
        model = _deeplabv3(cfg, num_classes + 1)
    elif cfg.arch == "deeplabv2":
        backbone = build_seg_backbone(cfg.backbone, cfg.output_stride)
        head = ASPPv2(backbone.out_channels, num_classes + 1, cfg.aspp_rates)
        model = SegNet(backbone, head, num_classes, cfg.output_stride, "deeplabv2", cfg.backbone)
    else:
        raise ValueError(f"model.arch: expected deeplabv2 or deeplabv3, got {cfg.arch!r}")
    path = weights_path(cfg.weights, cfg.backbone, log)
    if path is not None:
        if cfg.arch == "deeplabv3":
            load_torchvision_resnet(model.backbone, path, log)
        else:
            load_backbone_weights(model, cfg.backbone, path, log)
    total, trainable = count_parameters(model)
    log(f"model: {cfg.arch} ({cfg.backbone}), {model.num_maps} classes incl. background, "
        f"output stride {model.output_stride}, {total / 1e6:.2f}M parameters "
        f"({trainable / 1e6:.2f}M trainable)")
    return model


def sync_batchnorm(model: SegNet) -> SegNet:
    """The head's trainable BatchNorm as SyncBatchNorm (deeplabv3 on several CUDA ranks); the
    frozen backbone BatchNorm needs no synchronisation."""
    model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)
    return model

