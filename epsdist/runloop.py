"""What every distributed training stage shares (``epsdist/train.py`` and
``epsdist/segment.py`` string it together with their stage's step):

seed_everything -> build_engine (DeepSpeed, from the stage's optimizer and generated config)
-> resume -> per iteration: next(batches), set_lr (poly), the stage's train_step (which calls
``reduce_losses``: one all-reduce of the loss terms, the NaN check and the stop flag),
LoopControl.check (non-finite policy), RunLogger.record, LoopControl.finish (checkpoints,
SIGUSR1, ``--stop-after``) -> export.

``cfg`` is either stage's config (EPSConfig or SegConfig): only the ``seed``, ``train.*`` and
``run.*`` keys both have are read here.
"""
from __future__ import annotations

import json
import math
import os
import random
import time

import numpy as np
import torch

from . import dist as D
from .checkpoint import Checkpointer, atomic_torch_save, rng_state, set_rng_state, stop_reason
from .config import to_dict
from .skips import SkipCounter



# ------------------------------------------------------------------------------ build

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def precision(cfg, info: D.DistInfo) -> str:
    """The precision actually used: bf16/fp16 need CUDA, the CPU path runs fp32."""
    if info.device.type != "cuda" and cfg.train.precision != "fp32":
        return "fp32"
    return cfg.train.precision


def build_engine(model: torch.nn.Module, cfg, info: D.DistInfo, build_optimizer,
                 ds_config: dict):
    """The DeepSpeed engine of ``model`` (moved to the device, channels-last on CUDA with
    ``train.channels_last``) with the optimizer ``build_optimizer(model, cfg)`` and the
    generated DeepSpeed config ``ds_config``; ``train.compile`` compiles it."""
    import deepspeed
    model = model.to(info.device)
    if info.device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config)
    if cfg.train.compile:
        engine.compile()                     # torch.compile of the module, through DeepSpeed
    return engine


def poly_lr(base: float, iteration: int, max_iters: int, power: float) -> float:
    return base * (1 - iteration / max_iters) ** power


def set_lr(engine, cfg, iteration: int) -> float:
    lr = poly_lr(cfg.train.lr, iteration, cfg.train.max_iters, cfg.train.poly_power)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


# ----------------------------------------------------------------------- resume, batches, export

def resume(arg: str, ckpt: Checkpointer, engine, loader, cfg, info) -> int:
    """Restore model, optimizer, RNG states and loader position; returns the next iteration."""
    seed_everything(cfg.seed * 1000 + info.rank)                  # per-rank streams (dropout)
    path = ckpt.resolve(arg)
    if path is None:
        return 0
    client, rank_state = ckpt.load(engine, path)
    if rank_state is not None:
        set_rng_state(rank_state["rng"])
        loader.load_state_dict(rank_state["loader"])
    if info.is_main:
        print(f"resumed from {path} at iteration {client['iteration']}", flush=True)
    return client["iteration"]


def batches(loader):
    """Batches across epoch boundaries, forever."""
    while True:
        yield from loader


def export(cfg, info, engine, manifest: dict) -> None:
    """``run.dir/export/model.pt``: what the pseudo-mask stage needs, nothing else."""
    if not info.is_main:
        return
    path = os.path.join(cfg.run.dir, "export", "model.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    module = engine.module
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu()
             for k, v in module.state_dict().items()}
    atomic_torch_save({"state_dict": state, "config": to_dict(cfg),
                       "classes": list(manifest["classes"]), "num_maps": module.num_maps,
                       "iteration": cfg.train.max_iters}, path)
    print(f"exported {path}", flush=True)


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


# ------------------------------------------------------------------------------ one iteration

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


class LoopControl:
    """End-of-iteration bookkeeping shared by both trainers: the non-finite-loss policy
    (``train.on_nonfinite``, with the skip limits of ``epsdist.skips``), checkpoints every
    ``run.save_every`` iterations and at the end, SIGUSR1/SIGTERM (checkpoint, then stop) and
    the ``--stop-after`` crash simulation."""

    def __init__(self, cfg, info: D.DistInfo, engine, loader, ckpt, logger,
                 stop_after: int | None = None):
        self.cfg, self.info, self.engine, self.loader = cfg, info, engine, loader
        self.ckpt, self.logger, self.stop_after = ckpt, logger, stop_after
        self.last_finite = None
        self.skips = SkipCounter(cfg.train, getattr(ckpt, "client_state", None))  # resumed counts

    def check(self, it: int, finite: bool, losses: dict) -> None:
        """Remember the last finite losses, or apply the policy to a non-finite step."""
        if finite:
            self.last_finite = {"iteration": it + 1, **losses}
            self.skips.finite()
            return
        if self.cfg.train.on_nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite loss at iteration {it + 1} on at least one rank; last finite "
                f"values: {self.last_finite}. Lower train.lr, or set train.on_nonfinite=skip")
        self.skips.skip(it + 1)                  # fails past train.max_skipped_fraction / ..

    def finish(self, it: int, stop: bool) -> bool:
        """Checkpoint when due (or when stopping); True when the loop must end now (SIGUSR1)."""
        done = it + 1
        if done % self.cfg.run.save_every == 0 or done == self.cfg.train.max_iters or stop:
            self.ckpt.save(self.engine, done,
                           client_state={"iteration": done, "config": to_dict(self.cfg),
                                         **self.skips.state()},
                           rank_state={"rng": rng_state(), "loader": self.loader.state_dict()})
        if (stop or done == self.cfg.train.max_iters) and self.info.is_main:
            print(self.skips.summary(done), flush=True)
        if stop:
            self.logger.close()
            if self.info.is_main:
                print(f"stopping at iteration {done} on {stop_reason()} (checkpoint written)",
                      flush=True)
            return True
        if self.stop_after is not None and done == self.stop_after:
            self.logger.close()
            os._exit(3)                              # a crash: no cleanup, no final checkpoint
        return False


# ------------------------------------------------------------------------------ logging

class RunLogger:
    """Rank 0: a console line every ``run.log_every`` iterations, TensorBoard scalars, and the
    same numbers as JSON lines in ``run.dir/metrics.jsonl`` (appended; after a resume, a later
    line for an iteration supersedes an earlier one).

    ``record`` takes the stage's dict of losses (``stage1.log_values``, ``seg.step.log_values``),
    ``scalars`` any other numbers (validation results). ``cfg`` needs
    ``run.log_every``, ``train.max_iters``, ``train.batch_size`` and ``train.grad_accum``."""

    def __init__(self, run_dir: str, info: D.DistInfo, cfg, start: int):
        self.info, self.cfg = info, cfg
        self.writer = self.jsonl = None
        if info.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self.window_start, self.window_iters, self.wait = time.perf_counter(), 0, 0.0
        self.start = start

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
