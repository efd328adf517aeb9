"""What the GPU check runs: the sizes (full or smoke), seeded random inputs, the stage-1 model and
one plain training step (forward, classification + EPS loss, backward, SGD step).

Everything is random: random-initialised weights at the real sizes, random images, saliency and
labels. No data, no weights, no DeepSpeed (one GPU: a plain torch optimizer step measures the
same model, loss and backward the trainer runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Recipe values the stage-1 configs use (configs/voc_eps.yaml, configs/coco_eps.yaml).
LR, MOMENTUM, WEIGHT_DECAY, TAU = 0.01, 0.9, 5e-4, 0.4


@dataclass(frozen=True)
class TrainSize:
    """One stage-1 training workload: batch B of size x size crops, C classes, EPS lam."""
    batch: int
    size: int
    classes: int
    lam: float


@dataclass(frozen=True)
class MaskSize:
    """One pseudo-mask workload: an H x W image, C classes, L of them labelled."""
    height: int
    width: int
    classes: int
    labelled: int


@dataclass
class Plan:
    """Sizes and counts of one run. ``Plan.full()`` is the real thing, ``Plan.smoke()`` the
    same code path at tiny sizes (CPU, Triton's interpreter)."""
    smoke: bool
    backbone: str
    # EPS loss: name -> (B, K, h, w, S) logits (B, K, h, w), saliency (B, 1, S, S)
    loss_cases: dict
    # the loss as the training step feeds it (bf16 channels_last logits): name -> case name
    train_layout_cases: dict
    cam_cases: dict                       # name -> MaskSize (kernel correctness)
    train_sizes: dict                     # "voc"/"coco" -> TrainSize
    mask_sizes: dict                      # "voc"/"coco" -> MaskSize
    run_steps: int                        # fused-vs-reference training run length
    warmup_steps: int                     # untimed training steps before timing
    timed_steps: int                      # timed training steps
    mask_images: int                      # timed images per pseudo-mask row
    loss_reps: int                        # CPU only: timed calls per loss row
    compile_backend: str                  # torch.compile backend
    budget_s: float                       # whole run
    scales: tuple = (0.5, 1.0, 1.5, 2.0)  # pseudo-mask inference views (x 2 flips)
    dtypes: tuple = ("fp32", "bf16", "fp16")
    notes: list = field(default_factory=list)

    @staticmethod
    def full(steps: int = 20) -> "Plan":
        from epsdist_kernels.bench import CASES
        return Plan(
            smoke=False, backbone="resnet38",
            loss_cases=dict(CASES),
            train_layout_cases={"voc_b8_56/train": "voc_b8_56",
                                "coco_b16_41/train": "coco_b16_41"},
            cam_cases={"cam_voc": MaskSize(375, 500, 20, 3), "cam_coco": MaskSize(480, 640, 80, 8)},
            train_sizes={"voc": TrainSize(8, 448, 20, 0.5), "coco": TrainSize(16, 321, 80, 0.9)},
            mask_sizes={"voc": MaskSize(375, 500, 20, 3), "coco": MaskSize(480, 640, 80, 8)},
            run_steps=steps, warmup_steps=3, timed_steps=10, mask_images=20, loss_reps=1,
            compile_backend="inductor", budget_s=300.0)

    @staticmethod
    def smoke_plan(steps: int = 2) -> "Plan":
        return Plan(
            smoke=True, backbone="tiny",
            loss_cases={"tiny_b2_21": (2, 21, 9, 11, 40), "tiny_b3_81": (3, 81, 7, 7, 30)},
            train_layout_cases={"tiny_b2_21/train": "tiny_b2_21"},
            cam_cases={"cam_tiny": MaskSize(21, 30, 20, 3)},
            train_sizes={"voc": TrainSize(2, 48, 20, 0.5), "coco": TrainSize(2, 32, 80, 0.9)},
            mask_sizes={"voc": MaskSize(24, 32, 20, 2), "coco": MaskSize(16, 24, 80, 3)},
            run_steps=steps, warmup_steps=1, timed_steps=1, mask_images=2, loss_reps=1,
            compile_backend="eager", budget_s=600.0)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------ inputs

def eps_inputs(shape, device, seed=0):
    """float32 logits (B, K, h, w) with per-image class biases (so classes win regions, as in
    tests/test_eps_loss.py), saliency (B, 1, S, S) in [0, 1] with exact 0.5 ties, labels
    (B, K-1) ~ Bernoulli(0.5)."""
    B, K, h, w, S = shape
    g = torch.Generator().manual_seed(seed)
    cam = 2.0 * torch.randn(B, K, h, w, generator=g) + 3.0 * torch.randn(B, K, 1, 1, generator=g)
    sal = torch.rand(B, 1, S, S, generator=g)
    sal[:, :, ::5, ::3] = 0.5
    labels = (torch.rand(B, K - 1, generator=g) < 0.5).float()
    return cam.to(device), sal.to(device), labels.to(device)


def loss_bytes(shape, dtype, mode="fwd_bwd") -> int:
    """Ideal bytes of one loss call, the model of ``epsdist_kernels.bench.ideal_bytes``: the
    logits once, the B*h*w saliency samples used, the labels, + one gradient write (fwd_bwd)."""
    B, K, h, w, _ = shape
    cam = B * K * h * w * torch.empty((), dtype=dtype).element_size()
    total = cam + B * h * w * 4 + B * (K - 1) * 4
    return total + (cam if mode == "fwd_bwd" else 0)


def cam_inputs(size: MaskSize, dtype, device, seed=0, scales=(0.5, 1.0, 1.5, 2.0), stride=8):
    """The views of one image as inference makes them (as ``epsdist_kernels.bench``): per scale
    s a softmax over K = C+1 maps of round(H*s/8) x round(W*s/8), plain and flipped; labels
    (C,) on the CPU with L classes."""
    g = torch.Generator().manual_seed(seed)
    K = size.classes + 1
    views, flips = [], []
    for s in scales:
        h, w = max(1, round(size.height * s / stride)), max(1, round(size.width * s / stride))
        for flip in (False, True):
            logits = torch.randn(K, h, w, generator=g) * 3 + torch.randn(K, 1, 1, generator=g) * 2
            views.append(torch.softmax(logits, dim=0).to(dtype).to(device))
            flips.append(flip)
    labels = torch.zeros(size.classes)
    labels[torch.randperm(size.classes, generator=g)[:size.labelled]] = 1.0
    return views, flips, labels, (size.height, size.width)


def train_batches(size: TrainSize, n: int, device, seed=0):
    """n (image, saliency, labels) batches: normalised-looking images N(0, 1), blobby saliency
    in [0, 1] (a 1/32-resolution random field, upsampled), labels with 1-3 classes per image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    B, S, C = size.batch, size.size, size.classes
    for _ in range(n):
        image = torch.randn(B, 3, S, S, generator=g)
        coarse = torch.rand(B, 1, max(1, S // 32), max(1, S // 32), generator=g)
        sal = torch.nn.functional.interpolate(coarse, size=(S, S), mode="bilinear",
                                              align_corners=False).clamp_(0, 1)
        labels = torch.zeros(B, C)
        for b in range(B):
            k = int(torch.randint(1, 4, (1,), generator=g))
            labels[b, torch.randperm(C, generator=g)[:k]] = 1.0
        out.append((image.to(device), sal.to(device), labels.to(device)))
    return out


# ------------------------------------------------------------------------------ model and step

_CPU_MODELS: dict = {}


def build(backbone: str, classes: int, device, channels_last: bool = False, seed: int = 0):
    """The stage-1 EPS network (C+1 maps), random-initialised (seeded; the CPU copy is made
    once per process and copied, ResNet-38's initialisation takes seconds), in train mode."""
    import copy

    from epsdist.config import ModelConfig
    from epsdist.models import build_model
    key = (backbone, classes, seed)
    if key not in _CPU_MODELS:
        rng = torch.get_rng_state()
        torch.manual_seed(seed)
        _CPU_MODELS[key] = build_model(ModelConfig(backbone=backbone, weights="none",
                                                   eps_head=True), classes, log=lambda msg: None)
        torch.set_rng_state(rng)
    model = copy.deepcopy(_CPU_MODELS[key]).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def optimizer(model):
    """SGD with the authors' four parameter groups, as the trainer builds it."""
    from epsdist.models import param_groups
    return torch.optim.SGD(param_groups(model, lr=LR, weight_decay=WEIGHT_DECAY), lr=LR,
                           momentum=MOMENTUM)


def train_step(model, opt, batch, *, lam: float, precision: str, channels_last: bool,
               impl: str) -> torch.Tensor:
    """One stage-1 step as ``epsdist.stage1`` runs it (bf16 = autocast over float32 weights):
    classification loss + EPS saliency loss (``impl`` 'triton' fused, 'torch' reference),
    backward, SGD step. Returns the detached (classification, saliency) losses as one float32
    tensor of 2 (no host sync)."""
    from epsdist.loss import classification_loss, eps_loss
    image, sal, labels = batch
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        cam = model(image)
    loss_cls = classification_loss(cam, labels)
    loss_sal = eps_loss(cam, sal, labels, tau=TAU, lam=lam, impl=impl, check_inputs=False)
    opt.zero_grad(set_to_none=True)
    (loss_cls + loss_sal).backward()
    opt.step()
    return torch.stack([loss_cls.detach().float(), loss_sal.detach().float()])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    """Give the device memory of finished items back (CUDA only: gc.collect takes ~0.5 s)."""
    if torch.cuda.is_available():
        import gc
        gc.collect()
        torch.cuda.empty_cache()
