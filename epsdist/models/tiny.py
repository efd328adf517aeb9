"""A small, fast backbone for the synthetic recipes: trains from scratch on CPU in minutes.

Five conv-BN-ReLU stages, output stride 8 (a 112-px image gives 14x14 maps), 128 output
channels; the last stage is dilated (2) so the maps see the whole synthetic object. BatchNorm
is trainable here (there are no pretrained statistics to keep).
"""
from __future__ import annotations

from torch import nn

__all__ = ["TinyBackbone"]


def _stage(cin, cout, stride=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """(B, 3, H, W) -> (B, 128, ceil(H/8), ceil(W/8))."""

    out_channels = 128
    output_stride = 8
    widths = (24, 48, 96, 128, 128)

    def __init__(self):
        super().__init__()
        w = self.widths
        self.stage1 = _stage(3, w[0], stride=2)       # /2
        self.stage2 = _stage(w[0], w[1], stride=2)    # /4
        self.stage3 = _stage(w[1], w[2], stride=2)    # /8
        self.stage4 = _stage(w[2], w[3])
        self.stage5 = _stage(w[3], w[4], dilation=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.stage5(self.stage4(x))
