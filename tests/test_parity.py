"""Parity with the authors' released EPS code: what the paper recipes train.

Each test checks the project against an independent implementation of the released behaviour
(written from its description, float64 where it computes): the optimizer's update rule, the
CAM baseline's dropout, the global batch at any rank count, the resampling and colour jitter
(against PIL / torchvision themselves) and the inference precision key.
"""
import os
import types

import numpy as np
import pytest
import torch
from torch import nn

from epsdist import stage1
from epsdist.config import load_config
from epsdist.models import EPSNet, TinyBackbone, build_model, param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = ["voc_eps", "coco_eps", "voc_cam_baseline", "coco_cam_baseline"]


def recipe(name, *overrides):
    return load_config(os.path.join(REPO, "configs", f"{name}.yaml"), list(overrides))


# ------------------------------------------------------------------------------ 1. momentum

class FourGroups(nn.Module):
    """A small network with a parameter in each of the authors' four groups (the EPS head
    has no bias, so its fourth group is empty)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)               # backbone weight (1x, wd) + bias (2x)
        self.head = nn.Conv2d(6, 4, 1)               # head weight (10x, wd) + bias (20x)

    @property
    def from_scratch_modules(self):
        return [self.head]


def released_sgd_float64(params, mults, decays, grads, lr, max_iters, power, momentum):
    """The released optimizer's update rule in float64 numpy, written from its description:
    torch.optim.SGD(params, lr, weight_decay) -- the third positional argument is momentum,
    so momentum = the weight-decay value; no dampening, no Nesterov; per-group weight decay
    set in the groups; before every step, group lr = initial lr x (1 - step / max_step) **
    power (its ``momentum=0.9`` argument is this poly exponent)."""
    p = [x.astype(np.float64).copy() for x in params]
    buf = [None] * len(p)
    for t, g in enumerate(grads):
        scale = (1 - t / max_iters) ** power
        for i in range(len(p)):
            d = g[i].astype(np.float64) + decays[i] * p[i]
            buf[i] = d if buf[i] is None else momentum * buf[i] + d
            p[i] = p[i] - lr * mults[i] * scale * buf[i]
    return p


@pytest.mark.parametrize("name", PAPER)
def test_optimizer_of_each_paper_recipe_is_the_released_update_rule(name):
    cfg = recipe(name)
    assert cfg.train.momentum == cfg.train.weight_decay == 0.0005  # the released effective value
    torch.manual_seed(0)
    model = FourGroups()
    opt = stage1.build_optimizer(model, cfg)
    assert sorted(g["name"] for g in opt.param_groups) == sorted(
        ["backbone_weight", "backbone_bias", "head_weight", "head_bias"])
    params = [p for g in opt.param_groups for p in g["params"]]
    mults = [g["lr_mult"] for g in opt.param_groups for _ in g["params"]]
    decays = [g["weight_decay"] for g in opt.param_groups for _ in g["params"]]
    assert decays == [cfg.train.weight_decay if m in (1, 10) else 0.0 for m in mults]
    start = [p.detach().numpy().copy() for p in params]
    rng = np.random.default_rng(1)
    grads = [[rng.normal(size=p.shape).astype(np.float32) for p in params] for _ in range(50)]
    engine = types.SimpleNamespace(optimizer=opt)            # what set_lr needs of the engine
    for it, g in enumerate(grads):
        stage1.set_lr(engine, cfg, it)
        for p, gi in zip(params, g):
            p.grad = torch.from_numpy(gi)
        opt.step()
    ref = released_sgd_float64(start, mults, decays, grads, cfg.train.lr, cfg.train.max_iters,
                               cfg.train.poly_power, momentum=cfg.train.weight_decay)
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=0, atol=2e-6)
    # the textbook momentum would have trained something else
    far = released_sgd_float64(start, mults, decays, grads, cfg.train.lr, cfg.train.max_iters,
                               cfg.train.poly_power, momentum=0.9)
    assert max(np.abs(a - b).max() for a, b in zip(ref, far)) > 1.0


def test_momentum_09_is_one_override_away():
    assert recipe("voc_eps", "train.momentum=0.9").train.momentum == 0.9


# ------------------------------------------------------------------------------ 2. dropout

@pytest.mark.parametrize("name,dropout", [("voc_cam_baseline", 0.5), ("coco_cam_baseline", 0.5),
                                          ("voc_eps", None), ("coco_eps", None)])
def test_only_the_baseline_recipes_have_the_classifier_dropout(name, dropout):
    cfg = recipe(name, "model.backbone=tiny", "model.weights=none")
    model = build_model(cfg.model, cfg.data.num_classes, log=lambda m: None)
    if dropout is None:
        assert isinstance(model.dropout, nn.Identity)
    else:
        assert isinstance(model.dropout, nn.Dropout2d) and model.dropout.p == dropout
    assert not any(k.startswith("dropout") for k in model.state_dict())  # exports unchanged


def test_baseline_train_mode_output_is_channel_dropout_before_the_classifier():
    torch.manual_seed(0)
    model = EPSNet(TinyBackbone(), 4, eps_head=False, dropout=0.5).train()
    x = torch.randn(3, 3, 40, 48)
    with torch.no_grad():
        feats = model.backbone(x)                    # GroupNorm: no randomness in the backbone
        torch.manual_seed(7)
        out = model(x)
        # independent forward: every (image, channel) of the last feature map is zeroed with
        # probability 0.5 or scaled by 1 / (1 - 0.5), the same draws for the same seed
        torch.manual_seed(7)
        keep = torch.empty(3, feats.shape[1], 1, 1).bernoulli_(0.5)
        expected = torch.einsum("kc,bchw->bkhw", model.head.weight[:, :, 0, 0],
                                feats * keep / 0.5)
        assert torch.allclose(out, expected, atol=1e-5)
        assert 0.3 < keep.mean() < 0.7
        assert not torch.allclose(out, model.head(feats), atol=1e-3)   # it does drop
        model.eval()
        assert torch.equal(model(x), model.head(model.backbone(x)))      # eval: unchanged
