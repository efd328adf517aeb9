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
import sys
import time

from epsdist import dist as D
from epsdist import stage1
from epsdist.checkpoint import PREEMPT_EXIT, Checkpointer, StopRequest
from epsdist.config import (EPSConfig, add_config_args, config_from_args, dump_yaml, run_cli,
                            save_config)
from epsdist.models import build_model
from epsdist.runloop import (LoopControl, RunLogger, batches, build_engine, export, resume,
                             seed_everything, set_lr)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = StopRequest()                                  # SIGUSR1/SIGTERM -> checkpoint, exit 75
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
    engine = build_engine(model, cfg, info, stage1.build_optimizer,
                          stage1.deepspeed_config(cfg, info))
    loader = stage1.build_loader(cfg, info)
    ckpt = Checkpointer(os.path.join(cfg.run.dir, "checkpoints"), info, cfg.run.keep_last)
    start = resume(args.resume, ckpt, engine, loader, cfg, info)
    if train(cfg, info, engine, loader, ckpt, start, stop, args.stop_after):  # 4. the loop
        D.shutdown()
        return PREEMPT_EXIT
    export(cfg, info, engine, manifest)
    D.shutdown()
    return 0


def train(cfg: EPSConfig, info, engine, loader, ckpt: Checkpointer, start: int,
          stop: StopRequest, stop_after: int | None = None) -> bool:
    """Iterations ``start`` .. ``train.max_iters``; returns True when stopped by SIGUSR1 (after
    writing a checkpoint of the iteration reached)."""
    logger = RunLogger(cfg.run.dir, info, cfg, start)
    control = LoopControl(cfg, info, engine, loader, ckpt, logger, stop_after)
    stream = batches(loader)
    for it in range(start, cfg.train.max_iters):
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(cfg.train.grad_accum)]   # one optimizer step
        data_wait = time.perf_counter() - t0
        lr = set_lr(engine, cfg, it)
        result = stage1.train_step(engine, micro, cfg, info, stop.requested)
        control.check(it, result.finite, {"loss_cls": result.loss_cls,
                                          "loss_sal": result.loss_sal})
        losses, summary = stage1.log_values(result, cfg)
        logger.record(it, losses, lr, data_wait, summary)
        if info.is_main and cfg.run.panel_every and (it + 1) % cfg.run.panel_every == 0:
            logger.image("panel", stage1.panel(micro[-1], result.cam, cfg), it + 1)
        if control.finish(it, result.stop):
            return True
    logger.close()
    return False


if __name__ == "__main__":
    sys.exit(run_cli(main))                 # a config error: one line, exit 2
