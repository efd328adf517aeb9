"""Stage 1 (the EPS classifier) as named steps; ``epsdist/train.py`` strings them together.

check_config -> build_loader -> build_model -> build_engine (SGD with the authors' four
parameter groups, DeepSpeed config generated from the YAML) -> per iteration: set_lr,
train_step (forward, losses, a collective NaN check, backward, step) -> log / panels /
checkpoints -> export.

Losses: ``multilabel_soft_margin_loss(gap(cam)[:, :C], y)`` plus, for EPS models,
``loss.saliency_weight * eps_loss(cam, saliency, y)``; the CAM baseline (``model.eps_head:
false``) trains the classification term alone.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from . import dist as D
from .config import ConfigError, EPSConfig, resolve_batch
from .data.augment import IMAGENET_MEAN, IMAGENET_STD, TrainAugment
from .data.loader import ShardLoader
from .data.manifest import ManifestError, read_manifest
from .loss import classification_loss, eps_loss

log = logging.getLogger("epsdist.train")


# ------------------------------------------------------------------------------ checks

def check_config(cfg: EPSConfig, world_size: int | None = None) -> tuple[EPSConfig, dict]:
    """Everything that can be checked before a process group starts. Returns the config with
    the per-rank micro-batch and accumulation derived from ``train.global_batch_size`` and the
    rank count (``resolve_batch``; the launcher's WORLD_SIZE unless given), and the manifest."""
    if not cfg.data.train_shards:
        raise ConfigError("config key 'data.train_shards' is empty: give the shard directory "
                          "written by `python -m epsdist.data.shard`")
    try:
        manifest = read_manifest(cfg.data.train_shards)
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
                       device=info.device)


def precision(cfg: EPSConfig, info: D.DistInfo) -> str:
    """The precision actually used: bf16/fp16 need CUDA, the CPU path runs fp32."""
    if info.device.type != "cuda" and cfg.train.precision != "fp32":
        return "fp32"
    return cfg.train.precision


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


def build_engine(model: torch.nn.Module, cfg: EPSConfig, info: D.DistInfo):
    import deepspeed
    model = model.to(info.device)
    if info.device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, info))
    if cfg.train.compile:
        engine.compile()                     # torch.compile of the module, through DeepSpeed
    return engine


def poly_lr(base: float, iteration: int, max_iters: int, power: float) -> float:
    return base * (1 - iteration / max_iters) ** power


def set_lr(engine, cfg: EPSConfig, iteration: int) -> float:
    lr = poly_lr(cfg.train.lr, iteration, cfg.train.max_iters, cfg.train.poly_power)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


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
                            check_inputs=False)
    else:
        loss_sal = torch.zeros((), device=cam.device)
    return cam, loss_cls, loss_sal


def reduce_losses(parts: list[torch.Tensor], loss: torch.Tensor, info: D.DistInfo,
                  stop: bool = False) -> tuple[list[float], bool, bool]:
    """One all-reduce: the mean over ranks of each loss term in ``parts``, whether the total
    ``loss`` is finite on every rank, and whether any rank was asked to stop (SIGUSR1). Every
    rank gets the same answer, so all take the same branch: a NaN or a signal on one rank can
    neither hang nor desynchronise the others."""
    stats = torch.stack([p.detach().float() for p in parts]
                        + [(~torch.isfinite(loss.detach())).float(),
                           torch.tensor(float(stop), device=loss.device)])
    D.all_reduce_sum(stats)
    divisor = torch.tensor([info.world_size] * len(parts) + [1.0, 1.0], device=stats.device)
    *means, bad, stops = (stats / divisor).tolist()
    return means, bad == 0, stops > 0


def accumulated_step(engine, batches, losses, info: D.DistInfo, stop: bool = False):
    """One optimizer step over the iteration's micro-batches (``train.grad_accum`` of them, a
    list; a single batch is a list of one), for both stages: per micro-batch ``losses(batch)
    -> (loss, [terms], output)``, the collective finiteness/stop check (``reduce_losses``),
    backward and DeepSpeed's step, which scales each micro-batch's loss by 1 / grad_accum and
    updates the weights after the last one. With accumulation a non-finite micro-batch adds no
    gradient (a zero backward keeps DeepSpeed's micro-step count); without, the step is
    skipped. Returns (the terms' means over ranks and micro-batches, all finite, stop, the last
    output)."""
    if not isinstance(batches, (list, tuple)):
        batches = [batches]
    sums, all_finite, out = None, True, None
    for batch in batches:
        loss, terms, out = losses(batch)
        means, finite, stop = reduce_losses(terms, loss, info, stop)
        sums = means if sums is None else [a + b for a, b in zip(sums, means)]
        all_finite = all_finite and finite
        if finite:
            engine.backward(loss)
        elif len(batches) > 1:
            engine.backward(sum(p.sum() for p in engine.module.parameters()
                                if p.requires_grad) * 0.0)
        if finite or len(batches) > 1:
            engine.step()
    return [v / len(batches) for v in sums], all_finite, stop, out


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


# ------------------------------------------------------------------------------ loop control

class LoopControl:
    """End-of-iteration bookkeeping shared by both trainers: the non-finite-loss policy
    (``train.on_nonfinite``), checkpoints every ``run.save_every`` iterations and at the end,
    SIGUSR1 (checkpoint, then stop) and the ``--stop-after`` crash simulation."""

    def __init__(self, cfg, info: D.DistInfo, engine, loader, ckpt, logger,
                 stop_after: int | None = None):
        self.cfg, self.info, self.engine, self.loader = cfg, info, engine, loader
        self.ckpt, self.logger, self.stop_after = ckpt, logger, stop_after
        self.skipped_steps, self.last_finite = 0, None

    def check(self, it: int, finite: bool, losses: dict) -> None:
        """Remember the last finite losses, or apply the policy to a non-finite step."""
        if finite:
            self.last_finite = {"iteration": it + 1, **losses}
            return
        if self.cfg.train.on_nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite loss at iteration {it + 1} on at least one rank; last finite "
                f"values: {self.last_finite}. Lower train.lr, or set train.on_nonfinite=skip")
        self.skipped_steps += 1
        log.warning("non-finite loss at iteration %d: step skipped (%d so far)", it + 1,
                    self.skipped_steps)

    def finish(self, it: int, stop: bool) -> bool:
        """Checkpoint when due (or when stopping); True when the loop must end now (SIGUSR1)."""
        from .checkpoint import rng_state
        from .config import to_dict
        done = it + 1
        if done % self.cfg.run.save_every == 0 or done == self.cfg.train.max_iters or stop:
            self.ckpt.save(self.engine, done,
                           client_state={"iteration": done, "config": to_dict(self.cfg),
                                         "skipped_steps": self.skipped_steps},
                           rank_state={"rng": rng_state(), "loader": self.loader.state_dict()})
        if stop:
            self.logger.close()
            if self.info.is_main:
                print(f"stopping at iteration {done} on SIGUSR1 (checkpoint written)", flush=True)
            return True
        if self.stop_after is not None and done == self.stop_after:
            self.logger.close()
            os._exit(3)                              # a crash: no cleanup, no final checkpoint
        return False


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


# ------------------------------------------------------------------------------ logging

class RunLogger:
    """Rank 0: a console line every ``run.log_every`` iterations, TensorBoard scalars, and the
    same numbers as JSON lines in ``run.dir/metrics.jsonl`` (appended; after a resume, a later
    line for an iteration supersedes an earlier one).

    ``step`` logs a stage-1 ``StepResult``; ``record`` takes any dict of losses (the
    segmentation stage), ``scalars`` any other numbers (validation results). ``cfg`` needs
    ``run.log_every``, ``train.max_iters``, ``train.batch_size`` and ``train.grad_accum``."""

    def __init__(self, run_dir: str, info: D.DistInfo, cfg: EPSConfig, start: int):
        self.info, self.cfg = info, cfg
        self.writer = self.jsonl = None
        if info.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self.window_start, self.window_iters, self.wait = time.perf_counter(), 0, 0.0
        self.start = start

    def step(self, it: int, result: StepResult, lr: float, data_wait: float) -> None:
        total = result.loss_cls + self.cfg.loss.saliency_weight * result.loss_sal
        self.record(it, {"loss/cls": result.loss_cls, "loss/sal": result.loss_sal,
                         "loss/total": total}, lr, data_wait,
                    f"loss {total:.4f} (cls {result.loss_cls:.4f} sal {result.loss_sal:.4f})")

    def record(self, it: int, losses: dict, lr: float, data_wait: float,
               summary: str | None = None) -> None:
        """Count iteration ``it``; every ``run.log_every`` iterations (and at the last) log
        ``losses`` (name -> rank-mean value), lr, speed and data-wait share. ``summary`` is
        the loss part of the console line (default: the losses as name value)."""
        self.window_iters += 1
        self.wait += data_wait
        last = it + 1 == self.cfg.train.max_iters
        if not ((it + 1) % self.cfg.run.log_every == 0 or last):
            return
        elapsed = time.perf_counter() - self.window_start
        imgs = (self.window_iters * self.cfg.train.batch_size * self.cfg.train.grad_accum
                * self.info.world_size)
        rate = imgs / max(elapsed, 1e-9)
        wait = self.wait / max(elapsed, 1e-9)
        eta = (self.cfg.train.max_iters - it - 1) * elapsed / self.window_iters
        if self.info.is_main:
            scalars = {**losses, "lr": lr, "speed/img_per_s": rate,
                       "speed/data_wait_frac": wait}
            if self.info.device.type == "cuda":
                scalars["mem/gpu_max_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, it + 1)
            self.jsonl.write(json.dumps({"iteration": it + 1, **scalars}) + "\n")
            if summary is None:
                summary = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
            print(f"it {it + 1:>7}/{self.cfg.train.max_iters} | {summary} | lr {lr:.2e} | "
                  f"{rate:7.1f} img/s | data {100 * wait:4.1f}% | "
                  f"ETA {_duration(eta)}", flush=True)
        self.window_start, self.window_iters, self.wait = time.perf_counter(), 0, 0.0

    def scalars(self, iteration: int, values: dict) -> None:
        """Rank 0: ``values`` (name -> number) to TensorBoard and one metrics.jsonl line."""
        if not self.info.is_main:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, iteration)
        self.jsonl.write(json.dumps({"iteration": iteration, **values}) + "\n")

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` spent outside training (an evaluation) out of the speed."""
        self.window_start += seconds

    def image(self, tag: str, grid: torch.Tensor, it: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid.cpu(), it)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
