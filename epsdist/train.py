"""Stage 1: train the EPS classifier (or the CAM baseline) on webdataset shards.

    deepspeed [--num_gpus N | --hostfile H] epsdist/train.py --config configs/voc_eps.yaml [key=value ...]
    torchrun --nproc_per_node N epsdist/train.py --config ...
    srun python epsdist/train.py --config ...          (one task per GPU)
    python epsdist/train.py --config ...               (one process)

Options: ``--resume auto`` (default: continue from the newest complete checkpoint of
``run.dir`` if there is one), ``--resume none``, ``--resume RUN/checkpoints/iter_NNNNNNNN``.
Writes into ``run.dir``: ``config.yaml`` (the resolved config), ``tb/`` (TensorBoard),
``checkpoints/`` and ``export/model.pt`` (weights + config, for the pseudo-mask stage).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time

import numpy as np
import torch

from epsdist import dist as D
from epsdist import stage1
from epsdist.checkpoint import (PREEMPT_EXIT, Checkpointer, StopRequest, atomic_torch_save,
                                set_rng_state)
from epsdist.config import (EPSConfig, add_config_args, config_from_args, dump_yaml, save_config,
                            to_dict)
from epsdist.models import build_model


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="epsdist/train.py", description=__doc__.split("\n")[1])
    add_config_args(ap)
    ap.add_argument("--resume", default="auto",
                    help="'auto' (newest checkpoint of run.dir, if any), 'none', or a checkpoint dir")
    ap.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="simulate a crash: exit with status 3 right after iteration N "
                         "(no final checkpoint or export); used by the resume tests")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return ap.parse_intermixed_args(argv)        # overrides before and after the options


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = StopRequest()                                          # SIGUSR1 -> checkpoint, exit 75
    cfg = config_from_args(args)                                  # 1. config
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    cfg, manifest = stage1.check_config(cfg)                      #    checked before any rank waits
    info = D.setup(cfg.run.dist_timeout_s)                        # 2. distributed
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"[rank {info.rank}] %(levelname)s %(name)s: %(message)s")
    if info.is_main:
        save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    seed_everything(cfg.seed)                                     # 3. build: same init on all ranks
    model = build_model(cfg.model, cfg.data.num_classes,
                        log=lambda m: logging.getLogger("epsdist.model").warning(m))
    engine = stage1.build_engine(model, cfg, info)
    loader = stage1.build_loader(cfg, info)
    ckpt = Checkpointer(os.path.join(cfg.run.dir, "checkpoints"), info, cfg.run.keep_last)
    start = resume(args.resume, ckpt, engine, loader, cfg, info)
    if train(cfg, info, engine, loader, ckpt, start, stop, args.stop_after):  # 4. the loop
        D.shutdown()
        return PREEMPT_EXIT
    export(cfg, info, engine, manifest)
    D.shutdown()
    return 0


def resume(arg: str, ckpt: Checkpointer, engine, loader, cfg: EPSConfig, info) -> int:
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


def train(cfg: EPSConfig, info, engine, loader, ckpt: Checkpointer, start: int,
          stop: StopRequest, stop_after: int | None = None) -> bool:
    """Iterations ``start`` .. ``train.max_iters``; returns True when stopped by SIGUSR1 (after
    writing a checkpoint of the iteration reached)."""
    logger = stage1.RunLogger(cfg.run.dir, info, cfg, start)
    control = stage1.LoopControl(cfg, info, engine, loader, ckpt, logger, stop_after)
    stream = batches(loader)
    for it in range(start, cfg.train.max_iters):
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(cfg.train.grad_accum)]   # one optimizer step
        data_wait = time.perf_counter() - t0
        lr = stage1.set_lr(engine, cfg, it)
        result = stage1.train_step(engine, micro, cfg, info, stop.requested)
        control.check(it, result.finite, {"loss_cls": result.loss_cls,
                                          "loss_sal": result.loss_sal})
        logger.step(it, result, lr, data_wait)
        if info.is_main and cfg.run.panel_every and (it + 1) % cfg.run.panel_every == 0:
            logger.image("panel", stage1.panel(micro[-1], result.cam, cfg), it + 1)
        if control.finish(it, result.stop):
            return True
    logger.close()
    return False


def export(cfg: EPSConfig, info, engine, manifest: dict) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
