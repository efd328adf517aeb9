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
from epsdist.models import EPSNet, TinyBackbone, build_model
from epsdist.runloop import set_lr

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
        set_lr(engine, cfg, it)
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


# ------------------------------------------------------------------------------ 4. resampling

def photos(n=3, size=(375, 500)):
    """VOC-sized photo-like images (smooth colour fields + texture) and smooth saliency maps."""
    from epsdist.data.bench import photo_like
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = photo_like(rng, *size)
        yy, xx = np.mgrid[0:size[0], 0:size[1]]
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        sal = np.clip(255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 80.0 ** 2)), 0, 255)
        out.append((img, sal.astype(np.uint8)))
    return out


def pil_resize(array: np.ndarray, hw) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(array).resize((hw[1], hw[0]), Image.BICUBIC))


def grey_levels(a, b):
    d = np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64))
    return d.mean(), d.max()


@pytest.mark.parametrize("long_side", [256, 350, 450, 512])
def test_training_resize_is_pils_antialiased_bicubic(long_side):
    from epsdist.data.augment import resize_bicubic
    for img, sal in photos():
        hw = (round(375 * long_side / 500), long_side)
        ours = resize_bicubic(torch.from_numpy(img).permute(2, 0, 1), hw).permute(1, 2, 0)
        mean, worst = grey_levels(ours, pil_resize(img, hw))
        assert mean < 0.05 and worst <= 2, (mean, worst)
        mean, worst = grey_levels(resize_bicubic(torch.from_numpy(sal)[None], hw)[0],
                                  pil_resize(sal, hw))
        assert mean < 0.05 and worst <= 2, (mean, worst)


@pytest.mark.parametrize("scale", [0.5, 1.5, 2.0])
def test_inference_scales_are_pils_bicubic_on_cpu_and_on_the_gpu_path(scale):
    """The inference views: the uint8 path (CPU) and the float path (the GPU's) both within
    rounding of PIL."""
    from epsdist.data.augment import resize_bicubic, resize_bicubic_float
    for img, _ in photos(2):
        hw = (round(375 * scale), round(500 * scale))
        ref = pil_resize(img, hw)
        x = torch.from_numpy(img).permute(2, 0, 1)[None]
        mean, worst = grey_levels(resize_bicubic(x, hw)[0].permute(1, 2, 0), ref)
        assert mean < 0.05 and worst <= 2, (mean, worst)
        as_gpu = resize_bicubic_float(x, hw)
        assert as_gpu.dtype == torch.uint8
        mean, worst = grey_levels(as_gpu[0].permute(1, 2, 0), ref)
        assert mean < 0.05 and worst <= 2, (mean, worst)


def test_inference_views_are_the_normalised_pil_resized_image():
    from epsdist.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from epsdist.cams import view_maps
    img, _ = photos(1)[0]
    identity = lambda x: x                                                    # noqa: E731
    views, flips = view_maps(identity, torch.from_numpy(img).permute(2, 0, 1)[None],
                             (0.5, 1.0, 1.5), True, eps=False)
    assert flips == [False, True] * 3
    for view, s in zip(views[::2], (0.5, 1.0, 1.5)):
        hw = (round(375 * s), round(500 * s))
        expected = (pil_resize(img, hw) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        expected = torch.from_numpy(np.maximum(expected, 0)).permute(2, 0, 1).float()
        assert view.shape == expected.shape
        assert (view - expected).abs().mean() < 0.05 / 255 / 0.224
        assert (view - expected).abs().max() <= 1 / 255 / 0.224 + 1e-5


@pytest.mark.parametrize("op,factors", [("brightness", (0.7, 0.93, 1.3)),
                                        ("contrast", (0.7, 1.07, 1.3)),
                                        ("saturation", (0.7, 1.11, 1.3)),
                                        ("hue", (-0.1, -0.003, 0.05, 0.1))])
def test_jitter_ops_are_torchvisions_pil_path(op, factors):
    """Each jitter op against torchvision's own implementation on the PIL image (what the
    authors ran): brightness, contrast, saturation exactly; hue within rounding of PIL's 8-bit
    HSV on a fraction of a percent of the pixels."""
    from PIL import Image
    import torchvision.transforms.v2.functional as TF
    from epsdist.data import augment
    for img, _ in photos(2):
        for f in factors:
            theirs = np.asarray(getattr(TF, f"adjust_{op}")(Image.fromarray(img), f))
            ours = getattr(augment, f"adjust_{op}")(img, f)
            assert ours.dtype == np.uint8 and ours.shape == img.shape
            mean, worst = grey_levels(ours, theirs)
            if op == "hue":
                assert mean < 0.02 and (ours != theirs).mean() < 0.01, (f, mean, worst)
            else:
                assert worst == 0, (f, mean, worst)


def test_train_augment_is_the_released_pil_pipeline():
    """The whole training transform against the released one built from PIL and torchvision
    (PIL bicubic resize of image and saliency, PIL flip, torchvision's PIL jitter ops, the
    crop), fed the same draws: within a small fraction of a grey level."""
    import random
    from PIL import Image
    import torchvision.transforms.v2.functional as TF
    from epsdist.data.augment import MEAN_U8, TrainAugment
    aug = TrainAugment(resize_long=(256, 512), crop_size=448)
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for i, (img, sal) in enumerate(photos()):
        for seed in range(3):
            out_img, out_sal = aug(img, sal, random.Random(f"{i}/{seed}"))
            rng = random.Random(f"{i}/{seed}")                      # the same draws, in order
            long_side = rng.randint(256, 512)
            size = (round(500 * long_side / 500), round(375 * long_side / 500))
            im = Image.fromarray(img).resize(size, Image.BICUBIC)
            sm = Image.fromarray(sal).resize(size, Image.BICUBIC)
            if rng.random() < 0.5:
                im, sm = (x.transpose(Image.FLIP_LEFT_RIGHT) for x in (im, sm))
            draws = [("brightness", rng.uniform(0.7, 1.3)), ("contrast", rng.uniform(0.7, 1.3)),
                     ("saturation", rng.uniform(0.7, 1.3)), ("hue", rng.uniform(-0.1, 0.1))]
            rng.shuffle(draws)
            for name, f in draws:
                im = ops[name](im, f)
            a, s = np.asarray(im), np.asarray(sm)
            H, W = a.shape[:2]
            ref_img = np.array(MEAN_U8, np.uint8)[None, None].repeat(448, 0).repeat(448, 1)
            ref_sal = np.zeros((448, 448), np.uint8)
            cy, iy, hh = (0, rng.randint(0, H - 448), 448) if H > 448 else (rng.randint(0, 448 - H), 0, H)
            cx, ix, ww = (0, rng.randint(0, W - 448), 448) if W > 448 else (rng.randint(0, 448 - W), 0, W)
            ref_img[cy:cy + hh, cx:cx + ww] = a[iy:iy + hh, ix:ix + ww]
            ref_sal[cy:cy + hh, cx:cx + ww] = s[iy:iy + hh, ix:ix + ww]
            mean, worst = grey_levels(out_img.permute(1, 2, 0), ref_img)
            assert mean < 0.1, (i, seed, mean, worst)
            mean, worst = grey_levels(out_sal[0], ref_sal)
            assert mean < 0.05 and worst <= 2, (i, seed, mean, worst)


# ------------------------------------------------------------------------------ 5. precision

def test_inference_precision_key():
    for name in PAPER:
        assert recipe(name).infer.precision == "fp32"
    assert recipe("voc_eps", "infer.precision=bf16").infer.precision == "bf16"
    from epsdist.config import ConfigError
    with pytest.raises(ConfigError, match="infer.precision"):
        recipe("voc_eps", "infer.precision=fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_inference_on_cuda_is_not_autocast():
    from epsdist.cams import view_maps
    torch.manual_seed(0)
    model = EPSNet(TinyBackbone(), 4).eval()
    img = torch.from_numpy(photos(1)[0][0]).permute(2, 0, 1)[None]
    cpu, _ = view_maps(model, img, (1.0,), False, eps=True)
    gpu, _ = view_maps(model.cuda(), img.cuda(), (1.0,), False, eps=True, precision="fp32")
    bf16, _ = view_maps(model, img.cuda(), (1.0,), False, eps=True, precision="bf16")
    torch.backends.cudnn.allow_tf32 = False
    assert (gpu[0].cpu() - cpu[0]).abs().max() < 1e-3
    assert (bf16[0].cpu() - cpu[0]).abs().max() > (gpu[0].cpu() - cpu[0]).abs().max()
