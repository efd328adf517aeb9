"""Stage 1 (the EPS classifier): what is particular to it; ``epsdist/train.py`` strings it
together with the run machinery every stage shares (:mod:`epsdist.runloop`).

check_config -> build_loader -> build_model -> runloop.build_engine with build_optimizer (SGD
with the authors' four parameter groups) and deepspeed_config (generated from the YAML) -> per
iteration: runloop.set_lr, train_step (runloop.accumulated_step: forward, losses, the collective NaN check of
``runloop.reduce_losses``, backward, step) -> log_values / panel -> runloop's checkpoints and
export.

Losses: ``multilabel_soft_margin_loss(gap(cam)[:, :C], y)`` plus, for EPS models,
``loss.saliency_weight * eps_loss(cam, saliency, y)``; the CAM baseline (``model.eps_head:
false``) trains the classification term alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import dist as D
from .config import ConfigError, EPSConfig, resolve_batch
from .data.augment import IMAGENET_MEAN, IMAGENET_STD, TrainAugment
from .data.loader import ShardLoader
from .data.manifest import ManifestError, read_manifest
from .data.source import fetch_options
from .loss import classification_loss, eps_loss
from .runloop import accumulated_step, precision


# ------------------------------------------------------------------------------ checks

def check_config(cfg: EPSConfig, world_size: int | None = None) -> tuple[EPSConfig, dict]:
    """Everything that can be checked before a process group starts. Returns the config with
    the per-rank micro-batch and accumulation derived from ``train.global_batch_size`` and the
    rank count (``resolve_batch``; the launcher's WORLD_SIZE unless given), and the manifest."""
    if not cfg.data.train_shards:
        raise ConfigError("config key 'data.train_shards' is empty: give the shard directory "
                          "written by `python -m epsdist.data.shard`")
    try:
        manifest = read_manifest(cfg.data.train_shards, fetch_options(cfg.data))
    except ManifestError as e:
        raise ConfigError(f"config key 'data.train_shards': {e}") from None
    if len(manifest["classes"]) != cfg.data.num_classes:
        raise ConfigError(f"config key 'data.num_classes' is {cfg.data.num_classes} but the "
                          f"shards in {cfg.data.train_shards} have {len(manifest['classes'])} "
                          f"classes")
    if cfg.model.weights != "none" and not os.path.isfile(cfg.model.weights):
        raise ConfigError(f"config key 'model.weights': no file {cfg.model.weights!r} (give "
                          f"the path of the ImageNet weights, or 'none' to train from scratch)")
    if world_size is None:
        world_size = int(D.launcher_env()[0]["WORLD_SIZE"])
    cfg = resolve_batch(cfg, world_size)
    if manifest["num_samples"] < cfg.train.global_batch_size:
        raise ConfigError(f"data.train_shards holds {manifest['num_samples']} samples: fewer "
                          f"than train.global_batch_size={cfg.train.global_batch_size}")
    return cfg, manifest


# ------------------------------------------------------------------------------ build

def build_loader(cfg: EPSConfig, info: D.DistInfo) -> ShardLoader:
    augment = TrainAugment(resize_long=tuple(cfg.data.resize_long), crop_size=cfg.data.crop_size)
    return ShardLoader(cfg.data.train_shards, batch_size=cfg.train.batch_size, rank=info.rank,
                       world_size=info.world_size, num_workers=cfg.data.num_workers,
                       seed=cfg.seed, augment=augment, shuffle_buffer=cfg.data.shuffle_buffer,
                       device=info.device, fetch=fetch_options(cfg.data))


def deepspeed_config(cfg: EPSConfig, info: D.DistInfo) -> dict:
    """The DeepSpeed config, generated from the YAML (never kept by hand beside it).

    bf16 runs as autocast over float32 weights (the step does it); fp16 uses DeepSpeed's
    fp16 mode with dynamic loss scaling; ZeRO stages 0-2 partition optimizer state/gradients.
    The micro-batch and accumulation come from ``resolve_batch`` for ``info.world_size`` ranks,
    so ``train_batch_size`` is ``train.global_batch_size`` at any rank count.
    """
    t = resolve_batch(cfg, info.world_size).train
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * info.world_size,
        "zero_optimization": {"stage": t.zero_stage},
        # DeepSpeed lists only its own optimizers as tested with ZeRO; torch's SGD partitions
        # like any other (tests/test_train.py trains with stages 1 and 2 against stage 0)
        "zero_allow_untested_optimizer": t.zero_stage > 0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if precision(cfg, info) == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if t.grad_clip > 0:
        ds["gradient_clipping"] = t.grad_clip
    return ds


def build_optimizer(model: torch.nn.Module, cfg: EPSConfig) -> torch.optim.SGD:
    """SGD with the authors' four groups: backbone weights 1x lr (+wd), backbone biases 2x,
    head weights 10x (+wd), head biases 20x."""
    from .models import param_groups
    groups = []
    for g in param_groups(model):
        if g["params"]:
            groups.append({"params": g["params"], "lr_mult": g["lr_mult"], "name": g["name"],
                           "lr": cfg.train.lr * g["lr_mult"],
                           "weight_decay": cfg.train.weight_decay if g["weight_decay_on"] else 0.0})
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)


# ------------------------------------------------------------------------------ step

@dataclass
class StepResult:
    loss_cls: float
    loss_sal: float
    finite: bool
    cam: torch.Tensor | None = None          # detached logits, for panels
    stop: bool = False                       # some rank got SIGUSR1: checkpoint and exit


def forward_losses(engine, batch, cfg: EPSConfig, info: D.DistInfo):
    """(cam, loss_cls, loss_sal) for one batch; loss_sal is 0 for the CAM baseline."""
    image = batch.image
    if info.device.type == "cuda" and cfg.train.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    autocast = precision(cfg, info) == "bf16"
    with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast):
        cam = engine(image)
    loss_cls = classification_loss(cam, batch.labels)
    if cfg.model.eps_head:
        loss_sal = eps_loss(cam, batch.saliency, batch.labels, tau=cfg.loss.tau,
                            lam=cfg.loss.lam, strategy=cfg.loss.strategy,
                            bg_classes=cfg.loss.bg_classes, impl=cfg.loss.impl,
                            check_inputs=False, compile=cfg.train.compile)
    else:
        loss_sal = torch.zeros((), device=cam.device)
    return cam, loss_cls, loss_sal


def train_step(engine, batches, cfg: EPSConfig, info: D.DistInfo,
               stop: bool = False) -> StepResult:
    """One optimizer step (``accumulated_step``): forward, losses, the collective
    finiteness/stop check, backward, step."""
    def losses(batch):
        cam, loss_cls, loss_sal = forward_losses(engine, batch, cfg, info)
        return loss_cls + cfg.loss.saliency_weight * loss_sal, [loss_cls, loss_sal], cam.detach()

    (loss_cls, loss_sal), finite, stop, cam = accumulated_step(engine, batches, losses, info,
                                                               stop)
    return StepResult(loss_cls, loss_sal, finite, cam, stop)


def log_values(result: StepResult, cfg: EPSConfig) -> tuple[dict, str]:
    """What ``RunLogger.record`` logs for a step: the losses by name and the console summary."""
    total = result.loss_cls + cfg.loss.saliency_weight * result.loss_sal
    return ({"loss/cls": result.loss_cls, "loss/sal": result.loss_sal, "loss/total": total},
            f"loss {total:.4f} (cls {result.loss_cls:.4f} sal {result.loss_sal:.4f})")


# ------------------------------------------------------------------------------ panels

def panel(batch, cam: torch.Tensor, cfg: EPSConfig) -> torch.Tensor:
    """A (3, H, W) grid for the first image: input | saliency | fg | bg | predicted saliency |
    CAM of the top class (each map upsampled to the crop size)."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid
    with torch.no_grad():
        cam = cam[:1].float()
        image = batch.image[:1].float()
        size = image.shape[2:]
        mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
        tiles = [(image * std + mean).clamp(0, 1)]

        def gray(m):
            m = F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
            return m.clamp(0, 1).expand(-1, 3, -1, -1)

        tiles.append(gray(batch.saliency[:1]))
        if cfg.model.eps_head:
            _, maps = eps_loss(cam, batch.saliency[:1], batch.labels[:1], tau=cfg.loss.tau,
                               lam=cfg.loss.lam, strategy=cfg.loss.strategy,
                               bg_classes=cfg.loss.bg_classes, impl="torch",
                               return_maps=True, check_inputs=False)
            tiles += [gray(maps.fg), gray(maps.bg), gray(maps.pred)]
        C = batch.labels.shape[1]
        top = int(cam.mean(dim=(2, 3))[0, :C].argmax())
        act = torch.relu(cam[:, top:top + 1])
        tiles.append(gray(act / (act.max() + 1e-5)))
        return make_grid(torch.cat(tiles), nrow=len(tiles), padding=2)


