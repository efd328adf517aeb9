"""Stage-1 classification networks: a backbone and a 1x1 localization-map head.

    model = build_model(cfg.model, num_classes=cfg.data.num_classes, log=print)
    cam = model(images)                        # (B, K, h, w) logits, K = C+1 (EPS) or C (CAM)
    optimizer = torch.optim.SGD(param_groups(model, lr=cfg.train.lr,
                                             weight_decay=cfg.train.weight_decay), ...)

Backbones (``model.backbone`` in the config):

* ``resnet38`` -- the wide ResNet-38 of PSA / EPS (output stride 8, 4096 channels); weights
  from the MXNet ImageNet ``.params`` file or a torch state dict with the same names.
* ``resnet50`` / ``resnet101`` -- torchvision ResNets, dilated to output stride 8 or 16
  (2048 channels); weights from a torchvision state-dict checkpoint.
* ``tiny`` -- a small from-scratch backbone for the synthetic recipes (output stride 8).

The head is the authors' ``fc8``: a bias-free 1x1 conv with Xavier-uniform initialisation,
C+1 output maps (last = background) when ``eps_head`` else C. The CAM baseline (``eps_head``
false) applies channel dropout (``Dropout2d``, ``model.cam_dropout``, 0.5) to the backbone's
last feature map before the head, as the released classification network does (its
``dropout7`` before global average pooling and ``fc8``; pooling and a 1x1 conv commute); the
released EPS network has none. Models never touch torch.distributed.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .mxnet_params import load_mxnet_params, resnet38_state_dict_from_mxnet, save_mxnet_params
from .resnet38 import (ResNet38, load_resnet38_imagenet, load_state_dict_checked,
                       read_torch_state_dict, report_missing)
from .resnets import TorchvisionResNet, load_torchvision_resnet
from .tiny import TinyBackbone

__all__ = [
    "EPSNet", "build_model", "build_backbone", "param_groups", "count_parameters", "weights_path",
    "load_backbone_weights",
    "ResNet38", "TorchvisionResNet", "TinyBackbone",
    "load_mxnet_params", "save_mxnet_params", "resnet38_state_dict_from_mxnet",
    "load_resnet38_imagenet", "load_torchvision_resnet",
]

BACKBONES = ("resnet38", "resnet50", "resnet101", "tiny")


class EPSNet(nn.Module):
    """``backbone`` + ``head`` (1x1 conv, no bias): ``forward(image) -> (B, K, h, w)`` logits.

    Attributes: ``num_classes`` (C), ``num_maps`` (K = C+1 with the EPS background map, else
    C), ``eps_head``, ``output_stride`` (h = ceil(H / output_stride)), ``backbone_name``.
    ``dropout`` > 0: ``Dropout2d(dropout)`` between backbone and head (the CAM baseline's).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, eps_head: bool = True,
                 backbone_name: str = "", dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.eps_head = bool(eps_head)
        self.num_maps = self.num_classes + 1 if self.eps_head else self.num_classes
        self.output_stride = int(backbone.output_stride)
        self.backbone_name = backbone_name or type(backbone).__name__
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv2d(backbone.out_channels, self.num_maps, 1, bias=False)
        nn.init.xavier_uniform_(self.head.weight)

    @property
    def from_scratch_modules(self) -> list:
        """Modules trained from scratch (the authors' ``from_scratch_layers``): the head."""
        return [self.head]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(image)))

    def extra_repr(self) -> str:
        return (f"backbone={self.backbone_name}, num_classes={self.num_classes}, "
                f"num_maps={self.num_maps}, output_stride={self.output_stride}")


def build_backbone(name: str, output_stride: int = 8) -> nn.Module:
    """The bare backbone ``name`` (randomly initialised)."""
    if name == "resnet38":
        if output_stride != 8:
            raise ValueError(f"model.output_stride: resnet38 has output stride 8 "
                             f"(dilated b5-b7), got {output_stride}")
        return ResNet38()
    if name in ("resnet50", "resnet101"):
        return TorchvisionResNet(int(name[len("resnet"):]), output_stride)
    if name == "tiny":
        if output_stride != 8:
            raise ValueError(f"model.output_stride: tiny has output stride 8, "
                             f"got {output_stride}")
        return TinyBackbone()
    raise ValueError(f"model.backbone: expected one of {', '.join(BACKBONES)}, got {name!r}")


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return total, sum(p.numel() for p in module.parameters() if p.requires_grad)


def load_backbone_weights(model: nn.Module, name: str, path: str, log) -> None:
    """Load the ImageNet weights file ``path`` into ``model.backbone`` (either stage's network)."""
    if name == "resnet38":
        load_resnet38_imagenet(model, path, log)
    elif name in ("resnet50", "resnet101"):
        load_torchvision_resnet(model, path, log)
    else:  # tiny: a torch state dict of the backbone (or of a whole EPSNet)
        state = read_torch_state_dict(path)
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")} \
            or state
        state = {"backbone." + k: v for k, v in state.items()}
        missing, unexpected = load_state_dict_checked(model, state, path, name)
        log(f"{name}: loaded {len(state) - len(unexpected)} tensors from '{path}'")
        report_missing(log, name, missing, "backbone.")
        if unexpected:
            log(f"WARNING: {name}: {len(unexpected)} entries of '{path}' match no parameter "
                f"(ignored): {', '.join(unexpected)}")


def weights_path(weights: str, backbone: str, log) -> str | None:
    """The file named by ``model.weights``, or None for ``none`` (training from scratch is
    logged: a warning except for the tiny backbone). A missing file is a FileNotFoundError that
    names ``model.weights``."""
    if weights.strip().lower() in ("none", ""):
        level = "note" if backbone == "tiny" else "WARNING"
        log(f"{level}: model.weights is 'none': training {backbone} from scratch "
            f"(random initialisation, no ImageNet weights)")
        return None
    path = os.path.expanduser(os.path.expandvars(weights))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.weights: weights file '{weights}' not found"
            + (f" (resolved to '{path}')" if path != weights else "")
            + f"; give the path of the {backbone} ImageNet weights, or 'none' to "
              f"train from scratch")
    return path


def build_model(cfg, num_classes: int, log=print) -> EPSNet:
    """The stage-1 network for ``cfg`` (a ``ModelConfig``) and ``num_classes`` foreground
    classes, with its backbone weights loaded.

    ``cfg.weights == "none"`` trains from scratch (logged as a warning); otherwise the file
    must exist (``FileNotFoundError`` naming ``model.weights``): for resnet38 an MXNet
    ``.params`` file or a torch state dict, for resnet50/101 a torchvision checkpoint, for
    tiny a torch state dict of the backbone.
    """
    backbone = build_backbone(cfg.backbone, cfg.output_stride)
    model = EPSNet(backbone, num_classes, eps_head=cfg.eps_head, backbone_name=cfg.backbone,
                   dropout=0.0 if cfg.eps_head else cfg.cam_dropout)
    path = weights_path(cfg.weights, cfg.backbone, log)
    if path is not None:
        load_backbone_weights(model, cfg.backbone, path, log)
    total, trainable = count_parameters(model)
    log(f"model: {cfg.backbone} backbone, {model.num_maps} maps "
        f"({'EPS: C+1' if model.eps_head else 'CAM: C'}), output stride "
        f"{model.output_stride}, {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)")
    return model


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, lr: float | None = None,
                 weight_decay: float | None = None, keep_empty: bool = False) -> list[dict]:
    """The authors' four SGD parameter groups (PSA / EPS ``get_parameter_groups``).

    ========================  =======  ============
    group (``name``)          lr_mult  weight decay
    ========================  =======  ============
    ``backbone_weight``       1        on
    ``backbone_bias``         2        off
    ``head_weight``           10       on
    ``head_bias``             20       off
    ========================  =======  ============

    Conv / Linear weights and biases split by whether the module is trained from scratch
    (``model.from_scratch_modules``, the head). Normalisation-layer parameters (trainable only
    in the tiny backbone; frozen in resnet38/50/101) go with the biases of their side. Frozen
    parameters (``requires_grad`` False) are left out. Every trainable parameter lands in
    exactly one group; anything else is an error, never a silent drop.

    Each group is ``{"params", "lr_mult", "weight_decay_on", "name"}``, plus ``"lr"`` =
    lr * lr_mult and ``"weight_decay"`` = weight_decay or 0 when those are given (then the list
    goes straight to ``torch.optim.SGD``). Empty groups are left out unless ``keep_empty``
    (some optimizer wrappers reject empty groups).
    """
    specs = [("backbone_weight", 1, True), ("backbone_bias", 2, False),
             ("head_weight", 10, True), ("head_bias", 20, False)]
    groups = [[] for _ in specs]
    scratch = {id(m) for top in getattr(model, "from_scratch_modules", [])
               for m in top.modules()}
    seen: dict[int, str] = {}
    for mname, m in model.named_modules():
        side = 2 if id(m) in scratch else 0
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                slot = side + (0 if pname == "weight" else 1)
            elif isinstance(m, _NORM_TYPES):
                slot = side + 1
            else:
                raise ValueError(f"param_groups: trainable parameter '{full}' of "
                                 f"{type(m).__name__} fits no group (conv/linear/norm layers)")
            if id(p) in seen:
                raise ValueError(f"param_groups: parameter '{full}' is shared with "
                                 f"'{seen[id(p)]}'")
            seen[id(p)] = full
            groups[slot].append(p)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    placed = [id(p) for g in groups for p in g]
    assert len(placed) == len(set(placed)) and set(placed) == trainable, \
        "param_groups: the groups do not cover every trainable parameter exactly once"
    out = []
    for (name, mult, wd_on), params in zip(specs, groups):
        if not params and not keep_empty:
            continue
        group = {"params": params, "lr_mult": mult, "weight_decay_on": wd_on, "name": name}
        if lr is not None:
            group["lr"] = lr * mult
        if weight_decay is not None:
            group["weight_decay"] = weight_decay if wd_on else 0.0
        out.append(group)
    return out
